"""Trainable tasks, chosen by `config.model.name`."""

from __future__ import annotations

import importlib

import ml_collections

from tokenizers_jax.tasks.base import MODEL, LossOutput, Networks, Objective, StepContext, Task

# model.name -> "module:class".
TASKS = {
    "detailflow_ar": "tokenizers_jax.tasks.detailflow_ar:DetailFlowARTask",
    "flowmo": "tokenizers_jax.tasks.flowmo:FlowMoTask",
    "detailflow": "tokenizers_jax.tasks.detailflow:DetailFlowTask",
    "maskgit": "tokenizers_jax.tasks.maskgit:MaskGITTask",
}


def build_task(config: ml_collections.ConfigDict) -> Task:
    name = config.model.name
    if name not in TASKS:
        raise ValueError(f"no training task for model {name!r}; known: {sorted(TASKS)}")
    module_name, class_name = TASKS[name].split(":")
    return getattr(importlib.import_module(module_name), class_name)(config)


__all__ = ["MODEL", "LossOutput", "Networks", "Objective", "StepContext", "Task", "TASKS",
           "build_task"]
