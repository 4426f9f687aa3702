"""``talr forecast`` and ``talr advise``: predict a fine-tuning grid before training (`sft.forecast`).

    talr forecast --model world:0 --out runs/fc
    talr forecast --model PATH --domain d2.jsonl --general d1.jsonl --lrs 1e-5,3e-5,1e-4 --out runs/fc
    talr advise --budget 2.0 --model world:0 --out runs/fc

``--model world:N`` is the tiny-transformer world with seed N (D2 = its SFT set, D1 = samples of
P1; ``--domain``/``--general`` are then not needed). Otherwise ``--model`` is a local HF folder,
a ``.gguf`` file or ``tiny[:k=v]``, and both JSONL files are read by `sft.data` (completion-only
labels: for D1 give general prompts with reference responses). Outputs in OUT: forecast.json,
forecast.md (the table), tradeoff.png (the predicted trade-off plane). ``advise`` reuses
OUT/forecast.json when it matches the inputs, else forecasts first.
"""
from __future__ import annotations

import argparse
import json
import math
from pathlib import Path


def rate_list(text: str, name: str) -> tuple:
    try:
        vals = tuple(float(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"--{name}: expected comma-separated numbers, got {text!r}") from None
    if not vals or any(not (0 < v < 1) or not math.isfinite(v) for v in vals):
        raise argparse.ArgumentTypeError(f"--{name}: every value must be in (0, 1), got {text!r}")
    return vals


def positive_int(text: str) -> int:
    v = int(text)
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}")
    return v


SEED_MAX = 2**32 - 1  # seeds of the world, the batches and the probe: numpy and torch both take [0, 2^32)


def method_list(text: str) -> str:
    """``--methods``: a non-empty comma list of distinct known methods (the text is kept as given)."""
    from sft.methods import forecast_methods  # torch-free

    known = forecast_methods()
    names = [m.strip() for m in text.split(",") if m.strip()]
    bad = [m for m in names if m not in known]
    if not names or bad or len(set(names)) != len(names):
        why = f"unknown {bad}" if bad else "repeated names" if names else "empty"
        raise argparse.ArgumentTypeError(f"{text!r}: {why}; expected a comma list of distinct methods from "
                                         f"{','.join(known)}")
    return text


def _world_seed(spec: str) -> int | None:
    """N of ``world:N`` (an integer in [0, 2^32)), None for any other model spec."""
    if not spec.startswith("world:"):
        return None
    n = spec.split(":", 1)[1].strip()
    if not (n.isascii() and n.isdigit()) or int(n) > SEED_MAX:
        raise argparse.ArgumentTypeError(f"{spec!r}: expected world:N with N an integer in [0, {SEED_MAX}]")
    return int(n)


def _model(spec: str) -> str:
    """``--model``: world:N, or a spec `sft.models.check_model_spec` accepts (tiny:k=v, folder, .gguf)."""
    if _world_seed(spec) is None:
        from sft.models import check_model_spec

        try:
            check_model_spec(spec)
        except (OSError, ValueError) as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None
    return spec


def _check_options(args) -> None:
    """The checks that need several options, before any work (`UserError`)."""
    from experiments.cli import UserError

    world = _world_seed(args.model) is not None
    given = [f"--{k}" for k in ("domain", "general") if getattr(args, k)]
    if world and given:
        raise UserError(f"{' and '.join(given)}: not used with --model {args.model} (the world has its own D1 and "
                        f"D2); drop them or give a model")
    if not world and len(given) < 2:
        raise UserError("--domain and --general are required unless --model is world:N")
    for k in ("domain", "general"):
        path = getattr(args, k)
        if path and not Path(path).is_file():
            raise UserError(f"--{k} {path}: no such file")
    budget = getattr(args, "budget", None)
    if budget is not None and (not math.isfinite(budget) or budget <= 0):
        raise UserError(f"--budget must be a positive number of bits, got {budget}")


def _common(p: argparse.ArgumentParser) -> None:
    from sft.methods import forecast_methods  # torch-free: --help needs no torch
    from theory.checks import ranged

    methods = ",".join(forecast_methods())
    p.add_argument("--model", required=True, type=_model,
                   help="world:N (tiny world, seed N) | HF folder | file.gguf | tiny[:k=v]")
    p.add_argument("--domain", help="D2: the SFT JSONL (not needed with world:N)")
    p.add_argument("--general", help="D1: general JSONL with reference responses (not needed with world:N)")
    p.add_argument("--methods", type=method_list, default=methods, help=f"comma list from {methods} (sft.methods)")
    p.add_argument("--lrs", type=lambda s: rate_list(s, "lrs"), default=(3e-5, 9.49e-5, 3e-4, 9.49e-4, 3e-3),
                   help="comma-separated peak learning rates (default: 5 over two decades, 3e-5..3e-3)")
    p.add_argument("--steps", type=positive_int, default=150, help="optimizer steps T of each run")
    p.add_argument("--batch-size", type=positive_int, default=16, help="sequences per step B")
    p.add_argument("--seed", type=ranged("seed", 0, SEED_MAX, integer=True), default=0,
                   help="seed of the forecast's batches and probe")
    p.add_argument("--cache-dir", default=None, help="pretrained tiny worlds, by config hash (default: the user cache, $TALR_CACHE_DIR or ~/.cache/talr/worlds)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--micro-batch", type=ranged("micro-batch", 0, integer=True), default=0,
                   help="rows per forward/backward of the gradients and probes (0: the whole batch; exact, the "
                        "activations of fewer rows)")
    p.add_argument("--device", type=_device, default="cpu",
                   help="where the model and its passes run: cpu, cuda or cuda:I (the forecast's moments and replays "
                        "stay in host memory; `talr forecast-cost` gives both peaks)")
    p.add_argument("--spill-dir", default=None,
                   help="hold the moments on disk under this folder while a phase does not read them (the same "
                        "forecast in less memory, `sft.forecast_run.Spill`; its files are removed at the end)")
    p.add_argument("--size-model", choices=("replay", "diffusion", "auto"), default="auto",
                   help="how each configuration's dL is sized: auto (the default since version 7: diffusion where the "
                        "probe's gradient decorrelates within one step, else the replay), replay (version 5) or "
                        "diffusion (c(eta) x sum of squared rates from the probes, `sft.forecast.diffusion_dl`)")
    p.add_argument("--forecast-version", type=int, choices=(7, 8, 9), default=9,
                   help="9 (the default): version 8 with the diffusion's c below the lowest probe following the "
                        "probes' slope where c rises as the rate falls (`sft.forecast.diffusion_coefficient`); 8: c "
                        "held there; on diffusion-sized rows each token weighting's walk by its own Fisher-weighted "
                        "Adam step and LoRA's by a Fisher-weighted random step, measured at theta0 "
                        "(`sft.forecast.method_walk_factor`); 7: the method-blind walk (`sft.forecast.VERSIONS`). "
                        "Replay-sized rows (every tiny world) are the same under all three")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")


def _device(text: str) -> str:
    """``--device``: cpu, cuda or cuda:I (checked against the machine before the model is loaded)."""
    t = text.strip().lower()
    if t == "cpu" or t == "cuda" or (t.startswith("cuda:") and t[5:].isascii() and t[5:].isdigit()):
        return t
    raise argparse.ArgumentTypeError(f"{text!r}: expected cpu, cuda or cuda:I")


def _check_device(device: str) -> None:
    """A `UserError` naming what the machine has when ``device`` is not on it (before any model is loaded)."""
    if device == "cpu":
        return
    import torch

    from experiments.cli import UserError

    n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if (int(device.split(":")[1]) if ":" in device else 0) >= n:
        raise UserError(f"--device {device}: this machine has {n} CUDA device(s)" + ("" if n else "; use --device cpu"))


def register(sub) -> None:
    p = sub.add_parser("forecast", help="predict every (method, lr)'s dL(P1) and domain gain before training",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    _common(p)
    p.set_defaults(func=run_forecast)
    a = sub.add_parser("advise", help="the (method, lr) with the largest predicted gain within a dL(P1) budget",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    _common(a)
    a.add_argument("--budget", type=float, required=True, help="largest acceptable dL(P1), bits per sequence")
    a.set_defaults(func=run_advise)
    c = sub.add_parser("forecast-cost", help="the forecast's peak memory and compute for a model and grid, from the formulas",
                       description=COST_DOC, formatter_class=argparse.RawDescriptionHelpFormatter)
    _cost_options(c)
    c.set_defaults(func=run_cost)


COST_DOC = """The forecast's peak memory (`sft.forecast.forecast_memory_bytes`) and compute over one training run
(`sft.forecast.forecast_compute_ratio`) from their formulas, before any model is loaded: in one memory (a
CPU run), and split between the device and the host when the model runs on an accelerator (`talr forecast
--device cuda`: the moments and replays stay in host memory); and the run
length T from which the forecast costs at most --target of one run (its passes do not grow with T,
the run does). Defaults: the 3B setting of `sft.forecast` (N = 3.21e9, bf16 weights, float32
moments, T = 150, B = 16, 512-token sequences, 30 configurations), sized by diffusion as a real LLM's grid is
(version 8's walk factors on 4 batches per token weighting; --walk-batches 0: a replay-sized grid).

    talr forecast-cost
    talr forecast-cost --params 1.35e8 --weight-bytes 4 --steps 20 --batch-size 4 \\
        --len-d2 282 --n-general 24 --len-d1 96 --weightings 3 --grid 8 --probe-steps 6
"""


WALK_BATCHES = 4  # `sft.forecast.WALK_BATCHES` (the parser stays torch-free: --help needs no torch; a test ties them)


def _cost_options(p: argparse.ArgumentParser) -> None:
    from theory.checks import ranged

    def count(name):
        return ranged(name, 1, integer=True)

    p.add_argument("--params", type=ranged("params", 0, lo_open=True), default=3.21e9, help="trainable parameters N")
    p.add_argument("--weight-bytes", type=ranged("weight-bytes", 1, 8), default=2, help="bytes per weight w (bf16: 2)")
    p.add_argument("--store-bytes", type=ranged("store-bytes", 1, 8), default=4,
                   help="bytes per stored mean gradient and CE direction s (float32: 4; bf16 broke TALR on SmolLM2)")
    p.add_argument("--noise-bytes", type=ranged("noise-bytes", 1, 8), default=4,
                   help="bytes per stored batch covariance c (float32: 4; bf16 loses a real model's noise)")
    p.add_argument("--steps", type=count("steps"), default=150, help="steps T of one training run")
    p.add_argument("--batch-size", type=count("batch-size"), default=16, help="sequences per step B")
    p.add_argument("--len-d2", type=ranged("len-d2", 0, lo_open=True), default=512, help="mean tokens of a D2 sequence")
    p.add_argument("--n-general", type=count("n-general"), default=128, help="D1 sequences evaluated per configuration")
    p.add_argument("--len-d1", type=ranged("len-d1", 0, lo_open=True), default=512, help="mean tokens of a D1 sequence")
    p.add_argument("--n-batches", type=count("n-batches"), default=2, help="probe batches per token weighting")
    p.add_argument("--weightings", type=ranged("weightings", 1, 4, integer=True), default=4,
                   help="token weightings with gradients of their own (CE, TALR, DFT, FLOW)")
    p.add_argument("--grid", type=count("grid"), default=30, help="configurations G (methods x rates)")
    p.add_argument("--probe-steps", type=count("probe-steps"), default=6, help="steps k of each probe")
    p.add_argument("--probes", type=ranged("probes", 1, 2, integer=True), default=2, help="1, or 2 with the size probe")
    p.add_argument("--replay-flops", type=ranged("replay-flops", 0), default=8.9,
                   help="flops per parameter, step and configuration of a replay (8.9: version 5's blocks)")
    p.add_argument("--walk-batches", type=ranged("walk-batches", 0, 64, integer=True), default=WALK_BATCHES,
                   help=f"batches per token weighting of version 8's walk factors ({WALK_BATCHES}; 0: a replay-sized "
                        "grid, no factors)")
    p.add_argument("--gpu-gb", type=ranged("gpu-gb", 0, lo_open=True), default=80.0, help="memory of the device, GB")
    p.add_argument("--target", type=ranged("target", 0, lo_open=True), default=0.5,
                   help="compute target, in training runs (the T it needs is printed)")
    p.add_argument("--json", action="store_true", help="print the figures as JSON")


def forecast_cost(args) -> dict:
    """The figures `talr forecast-cost` prints (see COST_DOC)."""
    from sft.forecast import forecast_compute_ratio, forecast_memory_bytes

    mem = forecast_memory_bytes(args.params, weight_bytes=args.weight_bytes, store_bytes=args.store_bytes,
                                noise_bytes=args.noise_bytes, walk_batches=args.walk_batches)
    kw = dict(batch=args.batch_size, len_d2=args.len_d2, n_general=args.n_general, len_d1=args.len_d1,
              n_batches=args.n_batches, n_weightings=args.weightings, grid=args.grid, probe_steps=args.probe_steps,
              replay_flops=args.replay_flops, probes=args.probes, walk_batches=args.walk_batches)
    comp = forecast_compute_ratio(steps=args.steps, **kw)
    per_step = forecast_compute_ratio(steps=1, **kw)  # ratio(T) = passes(1) / T + replays (constant in T)
    floor = per_step["replay_ratio"]
    t_min = math.ceil(per_step["passes_ratio"] / (args.target - floor)) if args.target > floor else None
    return {"params": args.params, "memory_gb": {k: v / 1e9 for k, v in mem.items()},
            "fits": mem["peak"] / 1e9 <= args.gpu_gb, "fits_with_host_state": mem["device_peak"] / 1e9 <= args.gpu_gb,
            "gpu_gb": args.gpu_gb, "compute": comp,
            "target": args.target, "steps_for_target": t_min, "replay_floor": floor}


def run_cost(args) -> int:
    r = forecast_cost(args)
    if args.json:
        print(json.dumps(r, indent=1))
        return 0
    m, c = r["memory_gb"], r["compute"]
    print(f"N = {args.params:.3g} parameters, w = {args.weight_bytes:g} B a weight, s = {args.store_bytes:g} B a mean, "
          f"c = {args.noise_bytes:g} B a covariance")
    print(f"peak memory beside activations: {m['peak']:.1f} GB = the model {m['model']:.1f} + the largest of "
          f"a gradient pass {m['gradient_pass']:.1f}, a probe {m['probe']:.1f}, the rows {m['ce_family']:.1f}, "
          f"the walk factors {m['method_walk']:.1f} (+ chunks): {'fits' if r['fits'] else 'does not fit'} {args.gpu_gb:g} GB")
    print(f"model on the device, the forecast's state in host memory (talr forecast --device cuda): device "
          f"{m['device_peak']:.1f} GB beside activations ({'fits' if r['fits_with_host_state'] else 'does not fit'} "
          f"{args.gpu_gb:g} GB), host {m['host_peak']:.1f} GB")
    print(f"with the state a phase does not read on disk (talr forecast --spill-dir): {m['spill_peak']:.1f} GB in one "
          f"memory, host {m['spill_host_peak']:.1f} GB with the model on the device")
    print(f"compute: {c['ratio']:.3f} of one training run at T = {args.steps} (passes {c['passes_ratio']:.3f}, "
          f"replays {c['replay_ratio']:.3f}; of the passes, the walk factors {c['walk_ratio']:.3f})")
    t = r["steps_for_target"]
    print(f"at most {args.target:g} of a run from T = {t}" if t is not None else
          f"never at most {args.target:g} of a run: the replays alone cost {r['replay_floor']:.3f}")
    return 0


def _inputs(args):
    """(model0, d2 examples, d1 examples, pad id, the D1 sample as a `SampleTree` or None)."""
    import torch

    torch.set_num_threads(1)
    if args.model.startswith("world:"):
        from sft.world_runs import general_sample, general_tree
        from sft.worlds import WorldConfig, build_world, pretrain

        world = build_world(WorldConfig.default(variant="cot", seed=_world_seed(args.model)))
        model0, _ = pretrain(world, args.cache_dir)
        return model0, world.d2_train, general_sample(world, 128), world.pad_id, general_tree(world, 128)
    from experiments.cli import UserError, user_errors
    from sft.data import DataError, load_sft_dataset, read_eval_jsonl, tokenize_rows
    from sft.models import byte_tokenizer, load_model, load_tokenizer

    with user_errors(DataError, OSError):  # tiny models: the offline byte tokenizer
        tok = load_tokenizer(args.model) or byte_tokenizer()
        d2 = load_sft_dataset(args.domain, tok)
        d1 = tokenize_rows(tok, read_eval_jsonl(args.general))  # the rows `talr compare` reads (also {"text"})
    if len(d2) < args.batch_size:
        raise UserError(f"{args.domain} has {len(d2)} usable examples < --batch-size {args.batch_size}")
    with user_errors(OSError, ValueError):
        model0 = load_model(args.model, seed=args.seed)
    if args.model.startswith("tiny") and model0.config.vocab_size < len(tok):
        model0.resize_token_embeddings(len(tok))
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    return model0, [d2[i] for i in range(len(d2))], [d1[i] for i in range(len(d1))], pad, None


def forecast_config(args, pad):
    """The `sft.forecast.ForecastConfig` of parsed ``talr forecast`` arguments: ``--forecast-version``'s settings
    (`sft.forecast.VERSIONS`) over the defaults, ``pad`` the tokenizer's pad id."""
    from sft.forecast import VERSIONS, ForecastConfig

    methods = tuple(m.strip() for m in args.methods.split(",") if m.strip())
    return ForecastConfig(methods=methods, lrs=tuple(args.lrs), steps=args.steps, batch=args.batch_size,
                          seed=args.seed, pad_token_id=pad, micro_batch=args.micro_batch,
                          size_model=getattr(args, "size_model", "auto"),
                          **VERSIONS[getattr(args, "forecast_version", 9)])


def _request(args) -> dict:
    """What a stored forecast.json must match to be reused: the inputs, the options and the forecast model's
    revision (`sft.forecast.FORECAST_MODEL`), so a forecast of an older model is recomputed, not read."""
    from sft.forecast import FORECAST_MODEL

    return {"model": args.model, "domain": args.domain, "general": args.general, "methods": args.methods,
            "lrs": list(args.lrs), "steps": args.steps, "batch": args.batch_size, "seed": args.seed,
            **({"size_model": args.size_model} if getattr(args, "size_model", "auto") != "auto" else {}),
            "forecast_model": FORECAST_MODEL, "forecast_version": getattr(args, "forecast_version", 9)}


def forecast_to(args) -> dict:
    """Forecast into ``args.out`` (or reuse a matching forecast.json there)."""
    from experiments.cli import user_errors
    from experiments.outputs import markdown_table, write_json, write_text
    from experiments.outputs import tradeoff_figure
    from sft.forecast_run import forecast_grid

    out = Path(args.out)
    path = out / "forecast.json"
    if path.exists():
        old = json.loads(path.read_text())
        if old.get("request") == _request(args):
            return old
    with user_errors(ValueError):
        forecast_config(args, 0)  # ForecastConfig's own checks, before any model is loaded
    _check_device(args.device)
    spill = getattr(args, "spill_dir", None)
    if spill is not None and not Path(spill).is_dir():
        from experiments.cli import UserError

        raise UserError(f"--spill-dir {spill}: not a directory")
    model0, d2, d1, pad, tree = _inputs(args)
    model0 = model0.to(args.device)  # its passes there; the forecast's N-sized state stays in host memory
    res = forecast_grid(model0, d2, d1, forecast_config(args, pad), progress=not args.no_progress, d1_tree=tree,
                        spill=spill)
    res["request"] = _request(args)
    write_json(path, res)
    rows = res["rows"]
    txt = (f"# Forecast ({args.model}, T = {args.steps}, B = {args.batch_size})\n\ncompute ratio "
           f"{res['compute']['compute_ratio']:.3f} ({res['compute']['unit']}; forecast of the whole grid / one "
           "training run)\n\n" + markdown_table(["method", "lr", "predicted dL(P1) bits", "predicted domain gain bits"],
                                           [[r["method"], r["lr"], r["dL_P1_bits"], r["domain_gain_bits"]] for r in rows]) + "\n")
    write_text(out / "forecast.md", txt)
    tradeoff_figure(out / "tradeoff.png", rows)
    return json.loads(path.read_text())


def run_forecast(args) -> int:
    _check_options(args)
    res = forecast_to(args)
    print(Path(args.out, "forecast.md").read_text())
    return 0 if res["rows"] else 1


def run_advise(args) -> int:
    from sft.forecast import advise

    _check_options(args)
    res = forecast_to(args)
    best, second = advise(res["rows"], args.budget)
    if best is None:
        low = min(res["rows"], key=lambda r: r["dL_P1_bits"])
        print(f"no configuration is predicted within {args.budget:g} bits; the smallest predicted dL(P1) is "
              f"{low['dL_P1_bits']:.3g} bits ({low['method']} at lr {low['lr']:g})")
        return 1
    for tag, r in (("advice", best), ("runner-up", second)):
        if r is not None:
            print(f"{tag}: {r['method']} at lr {r['lr']:g}: predicted domain gain {r['domain_gain_bits']:.3g} bits, "
                  f"predicted dL(P1) {r['dL_P1_bits']:.3g} bits (budget {args.budget:g})")
    return 0
