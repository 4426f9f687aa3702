"""Domain and general evaluation (MedCalc-Bench, ESCI, code length, lm-eval adapter)."""
