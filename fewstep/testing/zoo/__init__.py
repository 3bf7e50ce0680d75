"""A tiny offline model zoo: random-weight pipelines of every supported family, built from configs on a CPU.

Each family is a real diffusers pipeline class with real component classes, shrunk so a backbone forward takes
milliseconds: latents are 8×8 (16×16 pixel images, VAE factor 2), text encoders have two layers of width 32-64.

* ``sd15``: ``StableDiffusionPipeline`` (``UNet2DConditionModel``, ``AutoencoderKL``, ``CLIPTextModel``) with a
  ``DDIMScheduler`` configured as Stable Diffusion ships it (scaled-linear betas, ``leading`` spacing,
  ``steps_offset=1``, ``set_alpha_to_one=False``, no clipping).
* ``sdxl``: ``StableDiffusionXLPipeline`` (two CLIP encoders, the second with a projection; ``text_time`` added
  conditioning) with SDXL's ``EulerDiscreteScheduler`` config.
* ``sd3``: ``StableDiffusion3Pipeline`` (two CLIP encoders + a T5 encoder) with ``FlowMatchEulerDiscreteScheduler``
  (static shift 3.0).
* ``sd35``: ``StableDiffusion3Pipeline`` with Stable Diffusion 3.5's transformer features: RMS-normalised queries and
  keys (``qk_norm="rms_norm"``, as in 3.5 Large and Medium) and a second, image-only attention in the first block
  (``dual_attention_layers``, as 3.5 Medium has in its first 13), with 3.5's scheduler (static shift 3.0).
* ``flux``: ``FluxPipeline`` (CLIP + T5, guidance embedding on) with ``FlowMatchEulerDiscreteScheduler`` using
  dynamic (resolution-dependent) shifting as FLUX.1 does.
* ``qwen_image``: ``QwenImagePipeline`` (``QwenImageTransformer2DModel`` on 2×2-packed latents,
  ``AutoencoderKLQwenImage`` with per-channel latent mean and std, a two-layer ``Qwen2_5_VLForConditionalGeneration``
  text encoder with a one-block vision tower) with Qwen-Image's scheduler config (dynamic exponential shift up to 0.9,
  ``shift_terminal`` 0.02).
* ``flux2``: ``Flux2Pipeline`` (FLUX.2 [dev]: ``Flux2Transformer2DModel`` with guidance embedding on 2×2-patchified
  latents, ``AutoencoderKLFlux2`` whose batch-norm statistics normalise the patchified latents, a
  ``Mistral3ForConditionalGeneration`` text encoder of 32 layers so that the pipeline's hidden-state layers 10, 20 and
  30 are intermediate ones as in Mistral Small 3.1, with a one-block Pixtral vision tower; ``mistral_tokenizer``) with
  ``FlowMatchEulerDiscreteScheduler`` shifting by resolution (the pipeline passes its own ``μ``).
* ``chroma``: ``ChromaPipeline`` (``ChromaTransformer2DModel`` on Flux's 2×2-packed latents, its modulations from a
  one-layer approximator; FLUX.1's ``AutoencoderKL``; a T5 encoder alone) with ``FlowMatchEulerDiscreteScheduler``
  shifting by resolution as FLUX.1's (the pipeline computes ``μ`` from the token count).
* ``zimage``: ``ZImagePipeline`` (Z-Image: ``ZImageTransformer2DModel``, a single-stream DiT taking lists of
  ``[c, 1, h, w]`` latents and of unpadded caption states, patch 2; FLUX.1's ``AutoencoderKL`` layout with its scaling
  and shift factors; a two-layer ``Qwen3Model`` text encoder read at its second-to-last hidden state;
  ``qwen3_tokenizer``) with Z-Image's scheduler config (static shift 6.0, as the base model ships it).
* ``wan21``: ``WanPipeline`` (Wan 2.1 text-to-video: ``WanTransformer3DModel``, ``AutoencoderKLWan`` with Wan's
  4× temporal and 8× spatial compression, a ``UMT5EncoderModel``) with ``FlowMatchEulerDiscreteScheduler`` at Wan's
  480p flow shift 3.0. Videos are 5 frames of 32×32 pixels (latents ``[b, 16, 2, 4, 4]``).
* ``wan21_i2v``: ``WanImageToVideoPipeline`` (Wan 2.1 image-to-video: the transformer takes 36 channels, the noisy
  latents followed by the frame mask and the first frame's latents, and attends to CLIP image tokens through
  ``image_dim`` / ``added_kv_proj_dim``; a two-layer ``CLIPVisionModel`` at 32×32 with its ``CLIPImageProcessor``),
  otherwise as ``wan21``.
* ``wan22``: Wan 2.2 T2V-A14B's layout: the same pipeline with two experts, ``transformer`` (high noise) and
  ``transformer_2`` (low noise), switched at ``boundary_ratio = 0.875``, and Wan 2.2 A14B's flow shift 12.0.
* ``wan22_ti2v``: Wan 2.2 TI2V-5B's layout: ``WanPipeline`` with ``expand_timesteps`` (one timestep per latent
  token), Wan 2.2's ``AutoencoderKLWan`` (2×2 pixel patches, residual sampling, 48 latent channels with per-channel
  statistics: 16× in space, 4× in time) and TI2V-5B's flow shift 5.0. Videos are 5 frames of 64×64 pixels (latents
  ``[b, 48, 2, 4, 4]``); ``WanImageToVideoPipeline.from_pretrained`` on the same directory is its image-to-video mode.
* ``ltx``: ``LTXPipeline`` (LTX-Video: ``LTXVideoTransformer3DModel`` on packed video tokens,
  ``AutoencoderKLLTXVideo`` with LTX's 8× temporal and 32× spatial compression, per-channel latent mean and std and a
  timestep-conditioned decoder, a T5 encoder) with LTX-Video's scheduler config (dynamic shift over the video token
  count, ``shift_terminal`` 0.1). Videos are 9 frames of 64×64 pixels (latents ``[b, 8, 2, 2, 2]``).
* ``pixart_sigma``: ``PixArtSigmaPipeline`` (``PixArtTransformer2DModel`` predicting ε with a learned variance:
  ``out_channels = 2 × 4``, no micro-conditions; a T5 encoder) with PixArt-Σ's ``DPMSolverMultistepScheduler`` config
  (linear betas 1e-4…0.02, DPM-Solver++ 2M, ε prediction). Its transformer's ``sample_size`` of 8 is not one of the
  pipeline's aspect-ratio bins: call it with ``use_resolution_binning=False``.
* ``sana``: ``SanaPipeline`` (``SanaTransformer2DModel`` with linear attention, ``AutoencoderDC`` (Sana's DC-AE, here
  4× instead of 32×), a two-layer ``Gemma2Model`` text encoder) with Sana's ``DPMSolverMultistepScheduler`` in flow
  mode (``use_flow_sigmas``, ``flow_shift`` 3.0, flow prediction). ``use_resolution_binning=False`` as above. Images are
  32×32 (``SanaPipeline`` wants sides divisible by 32), the DC-AE compresses 4× instead of Sana's 32×: latents 8×8.
* ``cogvideox``: ``CogVideoXPipeline`` (``CogVideoXTransformer3DModel`` with CogVideoX-5b's 3-D rotary embeddings, on
  latents the pipeline lays out as ``[b, f, c, h, w]``; ``AutoencoderKLCogVideoX`` with CogVideoX's 4× temporal and 8×
  spatial compression and CogVideoX-5b's scaling factor 0.7; a T5 encoder) with CogVideoX-2b's
  ``CogVideoXDDIMScheduler`` config (v-prediction, SNR shift 3, zero terminal SNR, ``trailing`` spacing). Videos are
  9 frames of 32×32 pixels (latents ``[b, 4, 3, 4, 4]`` in fewstep's layout); the transformer reads 16 T5 tokens
  (``max_text_seq_length``, the pipeline's 226).

* ``hunyuan15``: ``HunyuanVideo15Pipeline`` (HunyuanVideo 1.5 text-to-video: ``HunyuanVideo15Transformer3DModel`` taking
  the noisy latents, zero condition latents and a zero mask on its channels (``2c + 1``) and three token streams;
  ``AutoencoderKLHunyuanVideo15``, here 8× instead of 16× in space and 4× in time; a three-layer
  ``Qwen2_5_VLTextModel`` read at its third-to-last hidden state behind ``qwen2_chat_tokenizer``; a ByT5-style
  ``T5EncoderModel`` for quoted glyph text behind transformers' own ``ByT5Tokenizer``, which needs no files; the
  ``ClassifierFreeGuidance`` guider at HunyuanVideo 1.5 480p's scale 6) with ``FlowMatchEulerDiscreteScheduler`` at
  its 480p shift 5.0. Videos are 5 frames of 32×32 pixels (latents ``[b, 4, 2, 4, 4]``, one token per latent pixel).
* ``hunyuan15_i2v``: ``HunyuanVideo15ImageToVideoPipeline`` (HunyuanVideo 1.5 image-to-video: the same transformer
  reading the first frame's latents and mask on its channels and a one-layer ``SiglipVisionModel``'s tokens of it, 16
  at 16×16 pixels, with its ``SiglipImageProcessor``), otherwise as ``hunyuan15``.

Weights are seeded (the same bytes on every machine). A pipeline is saved once with ``save_pretrained`` into
``$FEWSTEP_CACHE/tiny/<family>`` (default ``~/.cache/fewstep/tiny/<family>``), written to a temporary directory and
renamed into place, and loaded back with ``DiffusionPipeline.from_pretrained(dir, local_files_only=True)``.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from fewstep.testing.zoo.common import (
    COGVIDEOX_FRAMES,
    COGVIDEOX_TEXT_TOKENS,
    FAMILIES,
    LTX_FRAMES,
    LTX_RESOLUTION,
    MARKER,
    RESOLUTION,
    SANA_RESOLUTION,
    SEED,
    TI2V_RESOLUTION,
    VIDEO_FRAMES,
    VIDEO_RESOLUTION,
    ZOO_VERSION,
    cache_root,
    check_family,
)
from fewstep.testing.zoo.flux import build_chroma, build_flux, build_flux2
from fewstep.testing.zoo.image import build_pixart_sigma, build_sana, build_sd3, build_sd15, build_sd35, build_sdxl
from fewstep.testing.zoo.qwen import build_qwen_image, build_zimage
from fewstep.testing.zoo.video import build_cogvideox, build_hunyuan15, build_hunyuan15_i2v, build_ltx
from fewstep.testing.zoo.wan import build_wan21, build_wan21_i2v, build_wan22, build_wan22_ti2v

__all__ = [
    "COGVIDEOX_TEXT_TOKENS", "FAMILIES", "MARKER", "ZOO_VERSION", "apply_resolution_marker", "build_tiny_pipeline",
    "cache_root", "load_tiny_pipeline", "tiny_path",
]  # fmt: skip

_BUILDERS: dict[str, Callable[[], Any]] = {
    "sd15": build_sd15,
    "sdxl": build_sdxl,
    "sd3": build_sd3,
    "flux": build_flux,
    "sd35": build_sd35,
    "qwen_image": build_qwen_image,
    "wan21": build_wan21,
    "wan21_i2v": build_wan21_i2v,
    "wan22": build_wan22,
    "wan22_ti2v": build_wan22_ti2v,
    "ltx": build_ltx,
    "pixart_sigma": build_pixart_sigma,
    "sana": build_sana,
    "cogvideox": build_cogvideox,
    "flux2": build_flux2,
    "chroma": build_chroma,
    "zimage": build_zimage,
    "hunyuan15": build_hunyuan15,
    "hunyuan15_i2v": build_hunyuan15_i2v,
}
# Video families: their marker also records the default frame count (``num_frames``).
_VIDEO: dict[str, dict[str, int]] = {
    family: {"resolution": VIDEO_RESOLUTION, "num_frames": VIDEO_FRAMES} for family in ("wan21", "wan21_i2v", "wan22")
}
_VIDEO["wan22_ti2v"] = {"resolution": TI2V_RESOLUTION, "num_frames": VIDEO_FRAMES}
_VIDEO["ltx"] = {"resolution": LTX_RESOLUTION, "num_frames": LTX_FRAMES}
_VIDEO["cogvideox"] = {"resolution": VIDEO_RESOLUTION, "num_frames": COGVIDEOX_FRAMES}
_VIDEO["hunyuan15"] = _VIDEO["hunyuan15_i2v"] = {"resolution": VIDEO_RESOLUTION, "num_frames": VIDEO_FRAMES}


def build_tiny_pipeline(family: str, seed: int = SEED) -> Any:
    """Build (not save) a tiny random pipeline of ``family``; the same ``seed`` gives the same weights.

    The global RNG state is restored afterwards.
    """
    builder = _BUILDERS[check_family(family)]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        pipe = builder()
    pipe.set_progress_bar_config(disable=True)
    return pipe


# ---------------------------------------------------------------------------------------------------------------------
# Cache
# ---------------------------------------------------------------------------------------------------------------------


def _is_current(path: Path, family: str) -> bool:
    try:
        marker = json.loads((path / MARKER).read_text())
    except (OSError, ValueError):
        return False
    return marker.get("family") == family and marker.get("version") == ZOO_VERSION


def tiny_path(family: str) -> Path:
    """The directory of the tiny ``family`` pipeline, built and saved on first use (atomic: temp dir + rename).

    Args:
        family: one of ``FAMILIES`` (``sd15``, ``sdxl``, ``sd3``, ``flux``, ``wan21``, ``wan22``, ``ltx``,
            ``cogvideox``, ...).

    Returns:
        A ``save_pretrained`` directory loadable with ``DiffusionPipeline.from_pretrained(path)`` offline.
    """
    path = cache_root() / check_family(family)
    if _is_current(path, family):
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{family}-", dir=path.parent))
    try:
        build_tiny_pipeline(family).save_pretrained(tmp, safe_serialization=True)
        resolution = SANA_RESOLUTION if family == "sana" else RESOLUTION
        marker = {"family": family, "version": ZOO_VERSION, "resolution": resolution, **_VIDEO.get(family, {})}
        (tmp / MARKER).write_text(json.dumps(marker, indent=2))
        _move_into_place(tmp, path, family)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path


def _move_into_place(tmp: Path, path: Path, family: str) -> None:
    """Rename ``tmp`` to ``path``; a stale ``path`` is renamed away first; a concurrent winner is kept."""
    if path.exists() and not _is_current(path, family):
        stale = Path(tempfile.mkdtemp(prefix=f".{family}-stale-", dir=path.parent))
        try:
            os.replace(path, stale / family)
        except OSError:
            pass  # another process moved it already
        shutil.rmtree(stale, ignore_errors=True)
    try:
        os.replace(tmp, path)
    except OSError:
        if not _is_current(path, family):  # not a concurrent build that finished first
            raise


def apply_resolution_marker(pipe: Any, path: str | os.PathLike) -> None:
    """Give a pipeline loaded from a tiny directory its recorded default resolution (``MARKER``); Flux pipelines
    otherwise assume 128·8 pixels. Video pipelines (Wan, LTX) get ``default_video_size = (frames, height,
    width)``, which ``fewstep.models.backbones.latent_shape`` reads in place of the pipeline's call defaults (Wan
    81 × 480 × 832, LTX 161 × 512 × 704). Directories without the marker are left alone."""
    marker = Path(path) / MARKER
    if not marker.is_file():
        return
    recorded = json.loads(marker.read_text())
    if "num_frames" in recorded:
        side = recorded["resolution"]
        pipe.default_video_size = (recorded["num_frames"], side, side)
    elif hasattr(pipe, "default_sample_size") or type(pipe).__name__ == "ZImagePipeline":  # Z-Image: 1024 otherwise
        pipe.default_sample_size = recorded["resolution"] // pipe.vae_scale_factor


def load_tiny_pipeline(family: str, dtype: torch.dtype = torch.float32) -> Any:
    """Load the tiny ``family`` pipeline from its cache directory (built on first use), offline."""
    from diffusers import DiffusionPipeline
    from diffusers.utils import deprecation_utils

    path = tiny_path(family)
    dtype_key = "dtype" if hasattr(deprecation_utils, "_resolve_dtype") else "torch_dtype"  # renamed in diffusers
    pipe = DiffusionPipeline.from_pretrained(str(path), local_files_only=True, **{dtype_key: dtype})
    apply_resolution_marker(pipe, path)
    return pipe
