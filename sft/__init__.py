"""talr.sft -- torch + transformers: losses, trainer, models, data, worlds, evaluation.

Public entries (one per capability; import them from their modules):

* losses (``sft.losses``): ``ce_loss``, ``talr_loss``, ``dft_loss``, ``clipped_loss`` -- plain
  functions ``(logits, labels, *, num_items_in_batch=None, **options)``; ``chunked_loss`` from
  hidden states without full-vocabulary logits;
* baselines: ``sft.regularizers.L2ToInit`` / ``KLToReference`` (k3), ``sft.weighting.attach_flow_weights``
  (FLOW), ``sft.merge.wise_ft`` (WiSE-FT), LoRA through ``TrainConfig(method="lora")``;
* training (``sft.trainer``): ``TrainConfig``, ``train``; reading a run folder back (``sft.runs``):
  ``checkpoints``, ``load_initial``, ``load_checkpoint``;
* data and models: ``sft.data.load_sft_dataset`` (Tables 4-6 templates), ``sft.models.load_model``
  (HF folder, GGUF, tiny Llama), ``sft.models.token_nll``;
* the bridge to `theory` (``sft.treeprobs``): a model's conditionals on a token tree, exact
  (``exact_full_logprobs``, ``exact_tree_logprobs``) or empirical for a real LLM
  (``build_empirical_trees``, ``empirical_tree_logprobs``);
* the tiny-transformer world (``sft.worlds``): ``WorldConfig``, ``build_world``, ``pretrain``,
  ``exact_metrics``;
* token analysis (``sft.analysis``): ``token_probs`` and the Figure 3 plots;
* evaluation (``sft.eval``): MedCalc-Bench, ESCI, code length, lm-eval adapter.

Nothing here is imported eagerly: ``import sft`` does not import torch.
"""
