"""MedM-VL training: config schema, recipe (pretrain / finetune: full, LoRA, QLoRA), merge, logs.

Entry point: ``medmvl-train`` (:func:`training.cli.main`); schema: ``training/configs/README.md``.
"""
