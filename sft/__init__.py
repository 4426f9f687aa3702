"""talr.sft -- torch + transformers: losses, trainer, models, data, worlds, evaluation.

Public entries (one per capability; import them from their modules):

* losses (``sft.losses``): ``ce_loss``, ``talr_loss``, ``dft_loss``, ``clipped_loss`` -- plain
  functions ``(logits, labels, *, num_items_in_batch=None, **options)``; ``chunked_loss`` from
  hidden states without full-vocabulary logits; ``compute_loss_func("talr")`` -- a drop-in for
  ``transformers.Trainer`` / TRL ``SFTTrainer(compute_loss_func=...)``;
* baselines: ``sft.regularizers.L2ToInit`` / ``KLToReference`` (k3), ``sft.weighting.attach_flow_weights``
  (FLOW), ``sft.merge.wise_ft`` (WiSE-FT), LoRA through ``TrainConfig(method="lora")``;
* training (``sft.trainer``): ``TrainConfig`` (torch-free, in ``sft.config``; every option
  range-checked), ``train`` (the whole run), ``build_trainer`` (the configured Trainer alone);
  the run folder (``sft.runs``): atomic checkpoints, ``prepare_run_dir`` (never mixes two runs),
  ``last_checkpoint`` / ``checkpoints`` (complete ones only), ``load_initial``, ``load_checkpoint``;
* data and models: ``sft.data.load_sft_dataset`` (Tables 4-6 templates), ``sft.models.load_model``
  (HF folder, GGUF, tiny Llama), ``sft.models.token_nll``;
* the bridge to `theory` (``sft.treeprobs``): a model's conditionals on a token tree, exact
  (``exact_full_logprobs``, ``exact_tree_logprobs``) or empirical for a real LLM
  (``build_empirical_trees``, ``empirical_tree_logprobs``);
* the tiny-transformer world (``sft.worlds``): ``WorldConfig``, ``build_world``, ``pretrain``,
  ``exact_metrics``;
* forecasting a grid before training (``sft.forecast``, pipeline in ``sft.forecast_run``):
  ``ForecastConfig``, ``forecast_grid``, ``advise`` -- each (method, lr)'s dL(P1) and domain gain
  from gradients at theta0, an AdamW replay and one probe;
* trajectories (``sft.trajectory``): ``TrajectoryCallback`` (cheap held-out domain / pooled general
  code lengths every k steps to ``trajectory.jsonl``, resumable), ``codelength_probe``, ``world_probe``;
  the stopping criterion ``sft.plateau.Plateau``;
* token analysis (``sft.analysis``): ``token_probs`` and the Figure 3 plots;
* evaluation (``sft.eval``): MedCalc-Bench, ESCI, code length, lm-eval adapter.

Nothing here is imported eagerly: ``import sft`` does not import torch.
"""
