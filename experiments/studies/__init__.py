"""Studies run by ``talr study``: `smollm2` (the paper's experiment on SmolLM2-135M-Instruct)."""
