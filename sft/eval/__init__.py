"""Domain and general evaluation (MedCalc-Bench, ESCI, code length, benchmarks, lm-eval adapter).

Public names are loaded on first use, so ``sft.eval.medcalc`` and ``sft.eval.esci`` stay free of
torch (they import only the standard library and numpy).
"""
from importlib import import_module

_PUBLIC = {
    # MedCalc-Bench
    "load_medcalc": "medcalc", "is_correct": "medcalc", "accuracy": "medcalc", "split_by_note": "medcalc",
    "write_sft_jsonl": "medcalc", "MedCalcFormatError": "medcalc",
    # ESCI
    "load_esci": "esci", "balanced_accuracy": "esci", "parse_label": "esci", "ESCIFormatError": "esci",
    # synthetic MedCalc-like data
    "generate_synthetic_medcalc": ("synth_medcalc", "generate"), "write_synthetic_csv": "synth_medcalc",
    # general capability
    "corpus_code_length_bits": "codelength", "CodeLength": "codelength", "humaneval_corpus": "codelength",
    "gsm8k_corpus": "codelength", "evaluate_gsm8k": "lmeval",
    # multiple-choice benchmarks from ready request files (lm-eval's acc / acc_norm)
    "evaluate_benchmarks": "benchmarks", "loglikelihoods": "benchmarks", "load_items": "benchmarks",
    "paired_se": "benchmarks", "BenchmarkFormatError": "benchmarks",
    # generation (batched greedy, KV cache, stop strings)
    "greedy_generate": "generate", "generate_and_score": "generate", "run_task": "lmeval", "GenerationTask": "lmeval",
}
__all__ = sorted(_PUBLIC)


def __getattr__(name):
    if name not in _PUBLIC:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    target = _PUBLIC[name]
    module, attr = target if isinstance(target, tuple) else (target, name)
    return getattr(import_module(f"{__name__}.{module}"), attr)
