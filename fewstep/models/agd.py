"""Adapter guidance distillation adapters (AGD, arXiv 2503.07274, ``cristianpjensen/agd``).

Small cross-attention adapters on a **frozen** backbone, conditioned on the guidance scale ``w`` and the timestep, so
one forward reproduces the two-forward CFG output. Each adapter wraps one module (the UNet's ``attn2`` in every
transformer block; SD3's ``transformer_blocks.i.attn``; any named module of a custom model):

* queries: the wrapped module's input hidden states ``x [b, L, D]`` (or ``[b, D]``) projected to ``h``;
* keys / values: a short token set ``[MLP(w), MLP(t)]`` (+ the projected prompt tokens when the module receives
  ``encoder_hidden_states``, + a learned class token when the backbone is called with ``class_labels``, as AGD's DiT
  adapters), each with a learned type embedding (the positional encoding); the embedders and the prompt projection
  are shared by all adapters (SDXL, width 320: 2.6% extra parameters), each adapter has its own q / k / v / out
  projections. The condition token matters: without it the values depend on ``w`` and ``t`` only, so a
  class-conditional model's class-dependent guidance could reach the adapter only through one attention weight;
* single-head SDPA, ``out_proj`` back to ``D`` **zero-initialised**, added to the wrapped module's output.

So training starts exactly at the base, and switching the adapters off (``disabled()``) recovers it exactly. The
adapters are attached with forward hooks, not by editing the model: they compose with peft/diffusers LoRAs,
IP-Adapter and ControlNet, and the timestep is read from the backbone's own call (a forward pre-hook), so any
scheduler with one forward per step samples with them (``set_guidance(w)`` before calling the pipeline).

Export: ``save_agd(adapters, dir)`` writes ``agd_adapters.safetensors`` + ``agd_config.json``;
``load_agd(pipe.unet, dir)`` attaches them to a diffusers model.
"""

from __future__ import annotations

import contextlib
import json
import math
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

WEIGHTS_FILE, CONFIG_FILE = "agd_adapters.safetensors", "agd_config.json"
DEFAULT_TARGETS = {
    "unet": r".*attn2$",  # UNet2DConditionModel cross-attention
    "unet2d": r".*attentions\.\d+$",  # UNet2DModel (class-conditional pixel models): its self-attention
    "transformer": r"^transformer_blocks\.\d+\.attn$",
}
FREQ_DIM = 256
_TOKEN_TYPES = 3  # w, t, condition (prompt tokens or the class token)


def sinusoidal(values: Tensor, dim: int = FREQ_DIM, max_period: float = 10_000.0) -> Tensor:
    """``[b] -> [b, dim]`` sinusoidal features (the DDPM timestep embedding)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=values.device) / half)
    args = values.float().reshape(-1, 1) * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=1)


def _mlp(out_dim: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(FREQ_DIM, out_dim), nn.SiLU(), nn.Linear(out_dim, out_dim))


class GuidanceAdapter(nn.Module):
    """One cross-attention adapter for a module whose hidden states have ``dim`` features.

    Args:
        dim: the wrapped module's input feature size ``D`` (its output size too, unless ``out_dim``).
        hidden_dim: attention width ``h`` (AGD: 320).
        context_dim: the prompt-token size fed to the module (``encoder_hidden_states``), or ``None``.
        out_dim: the wrapped module's output feature size (a ``Linear`` that changes size); default ``dim``.
    """

    def __init__(self, dim: int, hidden_dim: int, context_dim: int | None = None, out_dim: int | None = None) -> None:
        super().__init__()
        self.context_dim = context_dim  # prompt tokens arrive projected to h by the shared AGDAdapters.context_proj
        self.q_proj = nn.Linear(dim, hidden_dim)
        self.k_proj = nn.Linear(hidden_dim, hidden_dim)
        self.v_proj = nn.Linear(hidden_dim, hidden_dim)
        self.token_type = nn.Parameter(torch.zeros(_TOKEN_TYPES, hidden_dim))
        self.out_proj = nn.Linear(hidden_dim, out_dim or dim)
        nn.init.zeros_(self.out_proj.weight)  # AGD: the adapter starts as the identity (nothing added)
        nn.init.zeros_(self.out_proj.bias)

    def forward(self, x: Tensor, w_token: Tensor, t_token: Tensor, context: Tensor | None = None) -> Tensor:
        """``x [b, L, D]`` or ``[b, D]``; tokens ``[b, h]``; ``context [b, M, h]`` (projected prompt tokens).
        Returns the residual, shaped like ``x``."""
        shape, flat = x.shape, x.ndim == 2
        x = x.to(self.q_proj.weight.dtype)  # adapters stay fp32 on a bf16 / fp16 base
        if x.ndim == 4:  # UNet2DModel self-attention sees [b, C, H, W]
            x = x.flatten(2).transpose(1, 2)  # [b, H·W, C]
        q = self.q_proj(x[:, None] if flat else x)  # [b, L, h]
        tokens = [w_token + self.token_type[0], t_token + self.token_type[1]]
        kv = torch.stack(tokens, 1).to(q.dtype)  # [b, 2, h]
        if context is not None:
            kv = torch.cat([kv, context.to(q.dtype) + self.token_type[2]], 1)  # [b, 2 + M, h]
        out = F.scaled_dot_product_attention(q, self.k_proj(kv), self.v_proj(kv))  # single head
        out = self.out_proj(out)
        if len(shape) == 4:
            return out.transpose(1, 2).reshape(shape[0], -1, *shape[2:])
        return out[:, 0] if flat else out


class AGDAdapters(nn.Module):
    """Every adapter of one backbone plus the shared ``w`` / timestep embedders; attach with ``attach(backbone)``.

    Args:
        specs: ``{module_name: (dim, context_dim or None[, out_dim])}`` of the wrapped modules.
        hidden_dim: the adapters' attention width.
        timestep_scale: multiplies the backbone's timestep before the embedding (Flux feeds ``s``: use 1000).
        num_classes: class labels the backbone takes (``class_labels``, null class included); each gets a learned
            token. ``None``: no class token (text models).
    """

    def __init__(
        self,
        specs: dict[str, tuple],
        hidden_dim: int = 320,
        timestep_scale: float = 1.0,
        num_classes: int | None = None,
    ) -> None:
        super().__init__()
        self.specs = {k: (int(v[0]), int(v[1]) if v[1] else None, int(v[2] if len(v) > 2 else v[0]))
                      for k, v in specs.items()}  # fmt: skip
        self.hidden_dim, self.timestep_scale = hidden_dim, timestep_scale
        self.w_embed, self.t_embed = _mlp(hidden_dim), _mlp(hidden_dim)
        self.adapters = nn.ModuleDict(
            {_key(n): GuidanceAdapter(d, hidden_dim, c, o) for n, (d, c, o) in self.specs.items()}
        )
        contexts = sorted({c for _, c, _ in self.specs.values() if c})
        self.context_proj = nn.ModuleDict({str(c): nn.Linear(c, hidden_dim) for c in contexts})
        self.num_classes = num_classes
        self.class_embed = nn.Embedding(num_classes, hidden_dim) if num_classes else None
        self.enabled = True
        self._w: Tensor | None = None
        self._t: Tensor | None = None
        self._labels: Tensor | None = None
        self._handles: list[Any] = []

    # --- state set before a forward --------------------------------------------------------------------------

    def set_guidance(self, w: float | Tensor | None) -> None:
        """The guidance scale ``w`` (Imagen convention) of the next forwards: a float or ``[b]``; ``None``: off."""
        self._w = None if w is None else torch.as_tensor(w, dtype=torch.float32)

    @contextlib.contextmanager
    def disabled(self) -> Iterator[None]:
        """The base model exactly: adapters add nothing inside this context."""
        before, self.enabled = self.enabled, False
        try:
            yield
        finally:
            self.enabled = before

    def forward(self, run: Any, *args: Any) -> Any:
        """``run(*args)`` with the adapters active: lets a trainer-wrapped (DDP) ``AGDAdapters`` own the forward in
        which its parameters are used, so their gradients synchronise across ranks."""
        return run(*args)

    # --- hooks ----------------------------------------------------------------------------------------------------

    def attach(self, backbone: nn.Module) -> AGDAdapters:
        """Register the hooks on ``backbone`` (its modules named in ``specs``); returns ``self``."""
        self.detach()
        modules = dict(backbone.named_modules())
        missing = [n for n in self.specs if n not in modules]
        if missing:
            raise ValueError(f"AGD adapters target modules {missing[:3]} that {type(backbone).__name__} does not have.")
        self._handles.append(backbone.register_forward_pre_hook(self._capture_timestep, with_kwargs=True))
        for name in self.specs:
            hook = self._residual_hook(self.adapters[_key(name)])
            self._handles.append(modules[name].register_forward_hook(hook, with_kwargs=True))
        return self

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def _capture_timestep(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        t = kwargs.get("timestep", args[1] if len(args) > 1 else None)
        self._t = None if t is None else torch.as_tensor(t)
        labels = kwargs.get("class_labels")
        self._labels = None if labels is None or self.class_embed is None else torch.as_tensor(labels)

    def _residual_hook(self, adapter: GuidanceAdapter) -> Any:
        def hook(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
            if not self.enabled or self._w is None:
                return output
            x = args[0] if args else kwargs["hidden_states"]
            context = kwargs.get("encoder_hidden_states")
            if context is not None and adapter.context_dim:
                proj = self.context_proj[str(adapter.context_dim)]
                context = proj(context.to(proj.weight.dtype))  # [b, M, h]
            else:
                context = None
            if self._labels is not None:
                token = self.class_embed(self._labels.to(x.device).long().reshape(-1).expand(x.shape[0]))[:, None]
                context = token if context is None else torch.cat([context, token], 1)  # [b, M (+ 1), h]
            delta = adapter(x, *self._tokens(x), context)
            if isinstance(output, tuple):
                return (output[0] + delta.to(output[0].dtype), *output[1:])
            return output + delta.to(output.dtype)

        return hook

    def _tokens(self, x: Tensor) -> tuple[Tensor, Tensor]:
        if self._t is None:
            raise RuntimeError("AGD adapters saw no timestep: call the backbone they are attached to (attach()).")
        b = x.shape[0]
        w = self._w.to(x.device).reshape(-1).expand(b) if self._w.numel() == 1 else self._w.to(x.device)
        t = self._t.to(x.device).float().reshape(-1)
        t = t.expand(b) if t.numel() == 1 else t
        if w.shape[0] != b or t.shape[0] != b:
            raise ValueError(f"AGD: batch {b} but guidance scales {tuple(w.shape)} and timesteps {tuple(t.shape)}.")
        return self.w_embed(sinusoidal(w * 1000.0)), self.t_embed(sinusoidal(t * self.timestep_scale))


def _key(name: str) -> str:
    return name.replace(".", "__")


def find_targets(backbone: nn.Module, pattern: str | None = None) -> dict[str, tuple[int, int | None, int]]:
    """``{name: (dim, context_dim, out_dim)}`` for the modules matching ``pattern`` (default: every UNet ``attn2``,
    every SD3 joint ``attn``, every ``UNet2DModel`` self-attention). Sizes come from the module (diffusers
    ``Attention``: ``to_q`` / ``to_k`` / ``to_out``; ``nn.Linear``: ``in_features`` / ``out_features``)."""
    name = type(backbone).__name__
    kind = "unet2d" if name == "UNet2DModel" else "unet" if "UNet" in name else "transformer"
    regex = re.compile(pattern or DEFAULT_TARGETS[kind])
    specs: dict[str, tuple[int, int | None, int]] = {}
    for name, module in backbone.named_modules():
        if not name or not regex.search(name):
            continue
        if hasattr(module, "to_q"):
            dim, out = module.to_q.in_features, module.to_out[0].out_features
            context = module.to_k.in_features if getattr(module, "is_cross_attention", False) else None
        elif isinstance(module, nn.Linear):
            dim, context, out = module.in_features, None, module.out_features
        else:
            raise ValueError(f"AGD target {name!r} is a {type(module).__name__}; target attention or Linear modules.")
        specs[name] = (dim, context, out)
    if not specs:
        raise ValueError(
            f"No module of {type(backbone).__name__} matches the AGD target pattern {regex.pattern!r}. Set "
            "objective.target_modules to a regular expression over module names (e.g. '.*attn2$')."
        )
    return specs


def class_count(backbone: nn.Module) -> int | None:
    """Class labels a class-conditional diffusers UNet takes (``config.num_class_embeds``, null class included), or
    ``None`` (text models, custom modules)."""
    config = getattr(backbone, "config", None)
    count = config.get("num_class_embeds") if hasattr(config, "get") else None
    return int(count) if count else None


def save_agd(adapters: AGDAdapters, out_dir: str | Path, extra: dict[str, Any] | None = None) -> Path:
    """Write ``agd_adapters.safetensors`` and ``agd_config.json`` (specs, width, timestep scale, ``extra``)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().float().cpu().contiguous() for k, v in adapters.state_dict().items()}
    save_file(state, str(out_dir / WEIGHTS_FILE))
    config = {"specs": {k: list(v) for k, v in adapters.specs.items()}, "hidden_dim": adapters.hidden_dim,
              "timestep_scale": adapters.timestep_scale, "num_classes": adapters.num_classes,
              **(extra or {})}  # fmt: skip
    (out_dir / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
    return out_dir


def load_agd(backbone: nn.Module, path: str | Path) -> AGDAdapters:
    """Attach exported AGD adapters to ``backbone`` (e.g. ``pipe.unet`` or ``pipe.transformer``); returns them.

    Then ``adapters.set_guidance(w)`` and call the pipeline with ``guidance_scale=1`` (one forward per step).
    """
    path = Path(path)
    if not (path / CONFIG_FILE).is_file():
        raise FileNotFoundError(f"{str(path)!r} has no {CONFIG_FILE}: export the AGD run with `fewstep export`.")
    config = json.loads((path / CONFIG_FILE).read_text())
    specs = {k: tuple(v) for k, v in config["specs"].items()}
    adapters = AGDAdapters(specs, config["hidden_dim"], config["timestep_scale"], config.get("num_classes"))
    adapters.load_state_dict(load_file(str(path / WEIGHTS_FILE)))
    param = next(backbone.parameters())
    adapters.to(device=param.device).eval().requires_grad_(False)
    return adapters.attach(backbone)
