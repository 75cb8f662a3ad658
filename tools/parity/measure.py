"""The comparisons and the measurement (docs/recipe.md section 2): relative differences, the
check_* functions on a built `Setup`, `measure` (the report) and `format_report`.
"""

from __future__ import annotations

import dataclasses
import datetime
import functools
import math
import subprocess
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .build import Setup, build
from .common import CURRICULUM_STEPS, MODES, REFERENCE_COMMIT, REPO, STEP, ParityError

# ------------------------------------------------------------------------------ comparisons


def rel_diff(got: Any, want: Any) -> float:
    """||got - want|| / ||want|| over all elements (0 if equal; inf if want is 0 and got is not)."""
    import numpy as np

    g = np.asarray(got, np.float64).ravel()
    w = np.asarray(want, np.float64).ravel()
    if g.shape != w.shape:
        raise ParityError(f"comparing arrays of shapes {g.shape} and {w.shape}")
    d = float(np.linalg.norm(g - w))
    n = float(np.linalg.norm(w))
    if d == 0.0:
        return 0.0
    return d / n if n > 0 else math.inf


def tree_rel(got: Any, want: Any) -> tuple[float, float, str]:
    """(relative L2 of the whole tree, worst leaf's relative L2, that leaf's path)."""
    import jax
    import numpy as np

    g = {jax.tree_util.keystr(p): np.asarray(v, np.float64) for p, v in _flat(got)}
    w = {jax.tree_util.keystr(p): np.asarray(v, np.float64) for p, v in _flat(want)}
    if set(g) != set(w):
        raise ParityError(f"gradient trees differ: {sorted(set(g) ^ set(w))}")
    num = math.sqrt(sum(float(np.sum((g[k] - w[k]) ** 2)) for k in w))
    den = math.sqrt(sum(float(np.sum(w[k] ** 2)) for k in w))
    worst, worst_key = 0.0, ""
    for k in sorted(w):
        r = rel_diff(g[k], w[k])
        if r > worst:
            worst, worst_key = r, k
    return (num / den if den > 0 else (0.0 if num == 0 else math.inf)), worst, worst_key


def _flat(tree: Any) -> list:
    import jax

    return jax.tree_util.tree_flatten_with_path(tree)[0]


def _norm_l2(tree: Any) -> float:
    import numpy as np

    return math.sqrt(sum(float(np.sum(np.asarray(v, np.float64) ** 2)) for _, v in _flat(tree)))


def _git_head(path: Path) -> str | None:
    try:
        out = subprocess.run(
            ["git", "-C", str(path), "rev-parse", "HEAD"], capture_output=True, text=True
        )
    except OSError:
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def _git_dirty(path: Path, *paths: str) -> bool | None:
    try:
        out = subprocess.run(
            ["git", "-C", str(path), "status", "--porcelain", "--", *paths],
            capture_output=True,
            text=True,
        )
    except OSError:
        return None
    return bool(out.stdout.strip()) if out.returncode == 0 else None


# ------------------------------------------------------------------------------ the measurement


Record = Callable[..., None]


def check_sigmas(st: Setup, record: Record) -> dict:
    """p(i), the grid, the loss's sigma pair (the reference's ict_sigma_sampling_fn on the same
    indices) and the curriculum N(k)."""
    import jax.numpy as jnp
    import numpy as np

    from jcdm.ict import schedules

    cfg, n = st.cfg["joint"], st.num_scales
    grid = dict(sigma_min=cfg.sigma_min, sigma_max=cfg.sigma_max, rho=cfg.rho)
    rself, ns, pinned = st.ref_fw["joint"]
    pinned.choice_value = st.idx
    ref_hi, ref_lo = ns["get_sigma_sampling"]("iCT", st.key, st.y, jnp.asarray(STEP))
    p_ref = np.asarray(pinned.choice_p)
    p_jcdm = schedules.index_probs(n, cfg.p_mean, cfg.p_std, **grid)
    record("sigma p(i) at N(k)", rel_diff(p_jcdm, p_ref[: n - 1]))
    record("sigma p(i) beyond N(k)-1 (max)", float(np.max(np.abs(p_ref[n - 1 :]))), 0.0)
    grid_ref = rself.ict_t_steps_fn(jnp.arange(n), n)
    record("sigma grid", rel_diff(schedules.karras_sigmas(n, **grid), grid_ref))
    record("sigma pair (student)", rel_diff(st.sigma_hi, ref_hi))
    record("sigma pair (teacher)", rel_diff(st.sigma_lo, ref_lo))
    n_ref = [int(rself.ict_maximum_step_fn(cur_step=k)) for k in CURRICULUM_STEPS]
    n_jcdm = [schedules.num_scales(k, st.total_steps, cfg.s0, cfg.s1) for k in CURRICULUM_STEPS]
    unequal = sum(a != b for a, b in zip(n_ref, n_jcdm))
    record("curriculum N(k) (count of unequal)", float(unequal), 0.0)
    return {"steps": list(CURRICULUM_STEPS), "jcdm": n_jcdm, "reference": n_ref}


def check_forward(st: Setup, record: Record) -> None:
    """The backbones and heads on identical weights and inputs (train=False)."""
    import jax

    from jcdm.ict import objective, parameterization

    nets, cfg, rself = st.nets, st.cfg["joint"], st.ref_fw["joint"][0]
    sig = st.sigma_hi
    x_sig = st.y + parameterization.expand(sig, 4) * st.z
    c_in = parameterization.expand(parameterization.consistency_scalings(sig, cfg.sigma_min)[2], 4)
    x_in, c_noise = c_in * x_sig, parameterization.c_noise(sig)
    ref_ncsnpp = st.modules.ncsnpp.NCSNpp(dict(st.ref_cfg["joint"].model.diffusion))

    def ref_head_raw(m: Any, x: Any, cn: Any, f_in: Any, feat: Any, temb: Any) -> Any:
        # ScoreDistillPrecond.__call__'s "unetpp" branch without its scalings
        # (model/unetpp.py L905-914).
        feat = m.layer_norm_for_last_x_emb(feat)
        temb = m.layer_norm_for_t_emb(temb)
        return m.head(x, cn, f_in, feat, temb, False)

    @jax.jit
    def run(rp: dict, p: dict) -> dict:
        out = {}
        out["F"] = (
            nets.backbone_apply(p["backbone"], x_in, c_noise, None),
            ref_ncsnpp.apply({"params": rp["torso_state"]["NCSNpp_0"]}, x_in, c_noise, False),
        )
        f, temb, feat = objective.consistency_fn(
            nets.backbone_apply, p["backbone"], x_sig, sig, cfg
        )
        sig4 = sig[:, None, None, None]
        out["f"] = (
            f,
            rself.model.apply(
                {"params": rp["torso_state"]},
                x=x_sig,
                sigma=sig4,
                train=False,
                augment_labels=None,
            )[0],
        )
        # The heads on identical inputs: jcdm's f, feature and temb.
        out["D"] = (
            objective.head_denoiser(nets.head_apply, p["head"], x_sig, sig, f, feat, temb, cfg),
            rself.head.apply(
                {"params": rp["head_state"]},
                x=x_sig,
                sigma=sig4,
                F_x=jax.lax.stop_gradient(f),
                t_emb=temb,
                last_x_emb=feat,
                augment_labels=None,
                train=False,
            )[0],
        )
        f_in = c_in * f
        out["head"] = (
            nets.head_apply(p["head"], x_in, c_noise, f_in, feat, temb, None),
            rself.head.apply(
                {"params": rp["head_state"]},
                x_in,
                c_noise[:, None, None, None],
                f_in,
                feat,
                temb,
                method=ref_head_raw,
            ),
        )
        return out

    o = jax.device_get(run(st.ref_params, st.params))
    (j_raw, j_temb, j_feat), (r_raw, r_temb, r_feat) = o["F"]
    record("backbone F (raw NCSN++ output)", rel_diff(j_raw, r_raw))
    record("backbone temb", rel_diff(j_temb, r_temb))
    record("backbone feature (last_x_emb)", rel_diff(j_feat, r_feat))
    record("consistency f = c_skip x + c_out F", rel_diff(*o["f"]))
    record("head raw output", rel_diff(*o["head"]))
    record("head denoiser D", rel_diff(*o["D"]))


def check_losses(st: Setup, record: Record) -> tuple[dict, dict]:
    """The joint loss, its terms and gradients in both modes, and the grad-norm ratio."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from jcdm.ict import objective

    def jcdm_loss(p: dict, cfg: Any) -> tuple:
        return objective.joint_loss(
            p,
            st.y,
            st.key,
            STEP,
            backbone=st.nets.backbone_apply,
            head=st.nets.head_apply,
            cfg=cfg,
            total_steps=st.total_steps,
        )

    def ref_loss(rp: dict, z: Any, idx: Any, mode: str) -> tuple:
        _, ns, pinned = st.ref_fw[mode]
        pinned.normal_value, pinned.choice_value = z, idx
        opt_state = types.SimpleNamespace(gradient_step=jnp.asarray(STEP, jnp.float32))
        states = {"torso_state": types.SimpleNamespace(opt_state=opt_state)}
        return ns["joint_training_loss_fn"](rp, states, (st.y, st.key))

    modes, backbone_norms = {}, {}
    for mode in MODES:
        cfg = st.cfg[mode]
        jg = jax.jit(jax.value_and_grad(functools.partial(jcdm_loss, cfg=cfg), has_aux=True))
        rg = jax.jit(jax.value_and_grad(functools.partial(ref_loss, mode=mode), has_aux=True))
        (j_loss, j_m), j_g = jax.device_get(jg(st.params))
        (r_loss, r_m), r_g = jax.device_get(rg(st.ref_params, st.z, st.idx))
        if not np.allclose(j_m["sigma_mean"], np.mean(st.sigma_hi), rtol=1e-6, atol=0):
            raise ParityError(
                "this tool's replica of joint_loss's sigma draw no longer matches "
                "jcdm.ict.objective.joint_loss (did its key splitting change?)"
            )
        r_g = st.to_jcdm(r_g)
        terms = {
            "loss": (float(j_loss), float(r_loss)),
            "consistency term": (
                float(j_m["loss_ct"]),
                float(r_m[f"train/{st.ref_cfg[mode].framework.diffusion['loss']}"]),
            ),
            "0.3 x head DSM term": (
                float(cfg.joint_weight * j_m["loss_dsm"]),
                float(r_m["train/head_dsm_loss"]),
            ),
        }
        for name, (a, b) in terms.items():
            record(f"{mode}: {name}", rel_diff(a, b))
        whole, worst, worst_leaf = tree_rel(j_g, r_g)
        record(f"{mode}: gradient, whole tree (relative L2)", whole)
        record(
            f"{mode}: gradient, backbone (relative L2)",
            tree_rel(j_g["backbone"], r_g["backbone"])[0],
        )
        record(f"{mode}: gradient, head (relative L2)", tree_rel(j_g["head"], r_g["head"])[0])
        record(f"{mode}: gradient, worst single leaf", worst, note=worst_leaf)
        backbone_norms[mode] = (_norm_l2(j_g["backbone"]), _norm_l2(r_g["backbone"]))
        modes[mode] = {
            "reference_gradient_flow_from_head": bool(
                st.ref_cfg[mode].framework.diffusion["gradient_flow_from_head"]
            ),
            **{name: {"jcdm": a, "reference": b} for name, (a, b) in terms.items()},
            "backbone_grad_norm": dict(zip(("jcdm", "reference"), backbone_norms[mode])),
            "head_grad_norm": {"jcdm": _norm_l2(j_g["head"]), "reference": _norm_l2(r_g["head"])},
        }
    ratio = {
        side: backbone_norms["joint"][i] / backbone_norms["vanilla"][i]
        for i, side in enumerate(("jcdm", "reference"))
    }
    record("backbone grad-norm ratio joint/vanilla", rel_diff(ratio["jcdm"], ratio["reference"]))
    return modes, ratio


def check_ema(st: Setup, record: Record) -> dict:
    """The EMA decay of updates 1-6: the reference's CMEMA at gradient_step n (after the n-th
    update, consistency_framework.py L297-303) against jcdm's ema_decay_at(n - 1)."""
    import numpy as np

    from jcdm.ict import losses

    ema = st.modules.ema_cm.CMEMA(**st.ref_cfg["joint"].ema)
    ref = [float(np.float32(ema.get_current_decay(n))) for n in range(1, 7)]
    got = [float(losses.ema_decay_at(n - 1, st.ema_decay, st.ema_warmup)) for n in range(1, 7)]
    record(
        "EMA warm-up decays (count of unequal)", float(sum(a != b for a, b in zip(got, ref))), 0.0
    )
    return {"jcdm": got, "reference": ref}


def measure(ref: Path, size_name: str, tol: float, seed: int = 0) -> dict:
    """Build both models, run every comparison; returns the report (tools/reference_parity.py)."""
    st = build(ref, size_name, seed)
    import jax
    import numpy as np

    results: dict[str, dict] = {}

    def record(name: str, value: float, limit: float = tol, note: str = "") -> None:
        results[name] = {"rel_diff": value, "tol": limit, "ok": bool(value <= limit)}
        if note:
            results[name]["note"] = note

    curriculum = check_sigmas(st, record)
    check_forward(st, record)
    modes, ratio = check_losses(st, record)
    ema = check_ema(st, record)
    return {
        "tool": "tools/reference_parity.py",
        "date": datetime.date.today().isoformat(),
        "reference": {
            "dir": str(ref),
            "commit": _git_head(ref),
            "expected_commit": REFERENCE_COMMIT,
            "stubbed_imports": st.modules.stubbed,
        },
        "jcdm": {
            "commit": _git_head(REPO),
            "jcdm_or_gin_modified": _git_dirty(REPO, "jcdm", "gin"),
            "gin": "gin/reference.gin",
        },
        "config": {
            "size": size_name,
            "image": [st.size.image, st.size.image, 3],
            "batch": st.size.batch,
            "dtype": "float32",
            "platform": jax.default_backend(),
            "dropout": 0.0,
            "parameters": sum(int(np.prod(v.shape)) for _, v in _flat(st.params)),
            "parameters_backbone": sum(
                int(np.prod(v.shape)) for _, v in _flat(st.params["backbone"])
            ),
            "reference_backbone": dict(st.ref_cfg["joint"].model.diffusion),
            "reference_head": dict(st.ref_cfg["joint"].model.head),
            "jcdm_backbone": _module_fields(st.nets.backbone),
            "jcdm_head": _module_fields(st.nets.head),
            "jcdm_ict": dataclasses.asdict(st.cfg["joint"]),
            "step": STEP,
            "num_scales": st.num_scales,
            "sigma_student": [float(v) for v in np.asarray(st.sigma_hi)],
            "sigma_teacher": [float(v) for v in np.asarray(st.sigma_lo)],
            "seed": seed,
        },
        "tolerance": tol,
        "checks": results,
        "modes": modes,
        "grad_norm_ratio_joint_over_vanilla": ratio,
        "ema_warmup_decays": ema,
        "curriculum": curriculum,
        "ok": all(r["ok"] for r in results.values()),
    }


def _module_fields(m: Any) -> dict:
    out = {}
    for f in dataclasses.fields(m):
        if f.name in ("parent", "name"):
            continue
        v = getattr(m, f.name)
        out[f.name] = list(v) if isinstance(v, tuple) else (str(v) if f.name == "dtype" else v)
    return out


def format_report(rep: dict) -> str:
    c = rep["config"]
    lines = [
        f"reference_parity: jcdm {rep['jcdm']['gin']} vs boingkiri/joint_training "
        f"{(rep['reference']['commit'] or 'unknown commit')[:7]} ({rep['reference']['dir']})",
        f"config {c['size']}: {c['image'][0]}x{c['image'][1]}x3, batch {c['batch']}, "
        f"{c['parameters']:,} parameters, {c['dtype']} on {c['platform']}, dropout 0, "
        f"step {c['step']} (N = {c['num_scales']})",
        f"{'quantity':<48} {'rel. diff':>10} {'tol':>8}",
    ]
    for name, r in rep["checks"].items():
        flag = "ok" if r["ok"] else "FAIL"
        note = f"  [{r['note']}]" if r.get("note") else ""
        lines.append(f"{name:<48} {r['rel_diff']:>10.2e} {r['tol']:>8.0e}  {flag}{note}")
    ratio = rep["grad_norm_ratio_joint_over_vanilla"]
    lines.append(
        f"backbone grad-norm ratio joint/vanilla: jcdm {ratio['jcdm']:.6f}, "
        f"reference {ratio['reference']:.6f}"
    )
    ema = rep["ema_warmup_decays"]
    lines.append(f"EMA decays of updates 1-6: jcdm {ema['jcdm']}, reference {ema['reference']}")
    failed = [k for k, r in rep["checks"].items() if not r["ok"]]
    if failed:
        lines.append(f"FAIL: {len(failed)} difference(s) above tolerance: {', '.join(failed)}")
    else:
        lines.append(f"PASS: every difference within tolerance (relative {rep['tolerance']:.0e})")
    return "\n".join(lines)
