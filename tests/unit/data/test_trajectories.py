"""TBCM trajectory caches: resumable shards, points on the teacher's guided ODE, sCM on the cache."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from fewstep.data.trajectories import MANIFEST, TrajectoryCache, fill_cache, lognormal_level_weights
from fewstep.models.backbones import latent_shape
from fewstep.models.loading import load_teacher
from fewstep.models.prompts import encode_prompts
from fewstep.models.student import Student
from fewstep.noise.convert import bcast
from fewstep.objectives.consistency.tbcm import TBCM, TBCMConfig
from fewstep.objectives.consistency.trigflow import teacher_trig_velocity
from fewstep.objectives.protocol import OBJECTIVES, Batch
from fewstep.solvers.grids import teacher_taus
from tests.helpers import single_thread  # noqa: F401 (fixture)

SETTINGS = {"steps": 6, "points": 3, "w": 3.0}


@pytest.fixture(scope="module")
def sd3():
    teacher = load_teacher(SimpleNamespace(pretrained="tiny:sd3"))
    prompts = [["a red circle", "a blue square"], ["a cat", "a dog"], ["a tree", "a car"], ["a boat", "a sun"]]
    batches = [Batch(*encode_prompts(teacher, p)) for p in prompts]
    return teacher, batches


def build(teacher, batches, root, progress=False, level_jitter=False):
    cache = TrajectoryCache(root, SETTINGS)
    shape = latent_shape(teacher, 1)[1:]
    return fill_cache(cache, teacher, batches, 4, shape, SETTINGS["steps"], SETTINGS["points"], SETTINGS["w"],
                      seed=3, progress=progress, level_jitter=level_jitter)  # fmt: skip


def interrupted(batches, after: int):
    for i, batch in enumerate(batches):
        if i == after:
            raise KeyboardInterrupt("killed")
        yield batch


def test_cache_resumes_after_a_kill_without_lost_or_duplicated_shards(sd3, tmp_path):
    teacher, batches = sd3
    with pytest.raises(KeyboardInterrupt):
        build(teacher, interrupted(batches, 2), tmp_path / "cache")
    assert TrajectoryCache(tmp_path / "cache", SETTINGS).num_shards == 2
    # a kill between the shard's rename and the manifest update, and one in the middle of a write:
    (tmp_path / "cache" / "shard_00002.safetensors").write_bytes(b"half a shard")
    (tmp_path / "cache" / "shard_00003.safetensors.tmp").write_bytes(b"partial")
    resumed = build(teacher, batches, tmp_path / "cache", progress=True)
    build(teacher, batches, tmp_path / "fresh")  # the same shards, never interrupted
    manifest = json.loads((tmp_path / "cache" / MANIFEST).read_text())
    assert sorted(manifest["shards"]) == ["00000", "00001", "00002", "00003"] and resumed.num_shards == 4
    assert all(v["rows"] == 2 * SETTINGS["points"] for v in manifest["shards"].values())
    for k in range(4):
        a = load_file(str(tmp_path / "cache" / f"shard_{k:05d}.safetensors"))
        b = load_file(str(tmp_path / "fresh" / f"shard_{k:05d}.safetensors"))
        assert a.keys() == b.keys() and all(torch.equal(a[key], b[key]) for key in a)
    with pytest.raises(ValueError, match="other settings"):
        TrajectoryCache(tmp_path / "cache", {**SETTINGS, "w": 5.0})


@pytest.mark.parametrize("level_jitter", [False, True])
def test_cached_points_lie_on_the_teachers_guided_trajectory(sd3, tmp_path, level_jitter):
    teacher, batches = sd3
    cache = build(teacher, batches, tmp_path / "cache", level_jitter=level_jitter)
    shard = load_file(str(tmp_path / "cache" / "shard_00001.safetensors"))
    cond = batches[1].cond.repeat(1)
    rows = shard["u"].shape[0]
    cond = cond.index(torch.arange(rows) % 2)  # rows are point-major: [point0 × b, point1 × b, ...]
    assert torch.equal(shard["cond.prompt_embeds"], cond.prompt_embeds)
    F = teacher_trig_velocity(teacher, shard["x"], shard["u"], cond, None, SETTINGS["w"])
    assert (F - shard["F"]).abs().max() < 1e-4 * max(1.0, float(F.abs().max()))
    # x_u, u, F describe a point whose x̂0 = cos u·x − sin u·F: the same trajectory ends near it
    x0_hat = bcast(torch.cos(shard["u"]), F) * shard["x"] - bcast(torch.sin(shard["u"]), F) * shard["F"]
    assert x0_hat.shape == shard["x0"].shape and torch.isfinite(x0_hat).all()
    rows_, cond_ = cache.sample(5, torch.Generator().manual_seed(0))
    assert rows_["x"].shape[0] == 5 and cond_.prompt_embeds.shape[0] == 5


def _levels(cache: TrajectoryCache) -> torch.Tensor:
    return torch.unique(torch.cat([cache.shard(key)["u"] for key in sorted(cache.manifest["shards"])]))


def test_level_jitter_spreads_the_cached_levels_over_time(sd3, tmp_path):
    """One fixed grid repeats `steps` angles in every shard; jittered shards fill in between them."""
    teacher, batches = sd3
    fixed, jittered = _levels(build(teacher, batches, tmp_path / "a")), _levels(build(teacher, batches, tmp_path / "b",
                                                                                       level_jitter=True))  # fmt: skip
    assert len(fixed) <= SETTINGS["steps"] < len(jittered)
    assert float(jittered.min()) > 0 and float(jittered.max()) <= math.pi / 2 + 1e-6
    grid = teacher_taus(teacher.schedule, SETTINGS["steps"])
    for offset in (-0.5, -0.2, 0.3, 0.49):  # interior levels move by that fraction of a step; both ends stay
        moved = teacher_taus(teacher.schedule, SETTINGS["steps"], offset=offset)
        assert moved[0] == grid[0] and moved[-1] == grid[-1] and torch.all(moved[1:] < moved[:-1])
        assert not torch.equal(moved[1:-1], grid[1:-1])


@pytest.mark.parametrize("space", ["generation", "diffusion"])
def test_tbcm_trains_on_the_cache_without_data(sd3, tmp_path, space):
    _, batches = sd3
    assert OBJECTIVES.get("tbcm") is TBCM
    teacher = load_teacher(SimpleNamespace(pretrained="tiny:sd3"))  # a fresh base for this student's LoRA
    student = Student.lora(teacher, rank=4)
    config = TBCMConfig(cache_dir=str(tmp_path / "c"), num_shards=2, rollout_steps=4, points_per_trajectory=2,
                        guidance_scale=2.0, space=space, tangent_warmup_steps=0)  # fmt: skip
    objective = TBCM(config, teacher, student)
    with pytest.raises(ValueError, match="empty.*prepare"):
        objective.loss(batches[0], 0, "student")
    stream = iter(batches)
    objective.prepare(stream)  # one shard per batch until full: two batches taken
    assert objective.cache.num_shards == 2 and next(stream) is batches[2]
    objective.prepare(iter([]))  # full (a resume): takes no batch
    weighting = objective.auxiliary()["student"]
    params = [p for p in student.parameters() if p.requires_grad] + list(weighting.parameters())
    opt = torch.optim.AdamW(params, lr=1e-3)
    for step in range(3):
        out = objective.loss(batches[3], step, "student")  # x0 is None: no data set, no VAE
        opt.zero_grad()
        out.loss.backward()
        assert any(p.grad is not None and p.grad.abs().max() > 0 for p in student.parameters() if p.requires_grad)
        assert all(p.grad is not None for p in weighting.parameters())
        opt.step()
        assert math.isfinite(out.metrics["loss"]) and out.metrics["cache_shards"] == 2.0
    spec = objective.sampling_spec()
    assert spec.scheduler_class == "FlowMatchEulerDiscreteScheduler" and spec.steps[1]["levels"] == [1.0]


def test_lognormal_level_weights_turn_grid_points_into_scms_time_distribution():
    """Rows at 16 flow rollout levels (4 rows each), weighted: the drawn tan u follows LogNormal(p_mean, p_std)."""
    s = torch.linspace(1.0, 1.0 / 16, 16)  # the rollout levels, uniform in flow time
    u = torch.atan2(s, 1 - s).repeat_interleave(4)
    w = lognormal_level_weights(u, -0.8, 1.6)
    assert w.shape == u.shape and torch.all(w > 0)
    rows = torch.multinomial(w, 20000, replacement=True, generator=torch.Generator().manual_seed(0))
    log_tan = torch.log(torch.tan(u[rows].double().clamp(max=math.pi / 2 - 1e-6)))
    assert abs(float(log_tan.median()) - (-0.8)) < 0.35  # the lognormal's median, up to the grid's spacing
    uniform = torch.log(torch.tan(u.double().clamp(max=math.pi / 2 - 1e-6))).median()
    assert float(log_tan.median()) < float(uniform) - 0.5  # unweighted, the grid centres on tan u = 1 (s = 0.5)
    assert torch.allclose(w[:4], w[0].expand(4))  # rows of one level share its mass
