"""The Megatron engine: Megatron-Bridge training of the joint AR + masked-diffusion objective.

Importing this package imports nothing from Megatron; its modules do, and only
:func:`nemodiff_train.engines.megatron.train.build_job` (called by the CLI when ``engine.name ==
"megatron"``, through :mod:`nemodiff_train.orchestrate`) imports them. Pieces:

* :mod:`.attention`  two-stream core attention (RoPE applied per half, per document) and the layer spec
* :mod:`.context_parallel`  Megatron's CP split of the 2L row, the K/V all-gather, the local mask rows
* :mod:`.model`      HF checkpoint → Megatron model provider (AutoBridge), mask token, untied head
* :mod:`.step`       the forward step: ``core.noising`` + ``core.losses`` parts, per-token normalisation
* :mod:`.data`       prepared data → Megatron indexed datasets, blends, the dataset provider
* :mod:`.config`     ``to_container``: our typed :class:`~nemodiff_train.config.schema.Config` → ``ConfigContainer``
* :mod:`.export`     Megatron checkpoint → HF directory with the DLM settings (the conversion step of an export)
* :mod:`.train`      ``build_job(cfg) -> MegatronJob``, ``launch(job) -> TrainOutcome``; ``run(cfg)`` is both
                     (the entry point; it only trains)
"""
