"""Merges that learn: DAM (trained merging coefficients), parameter search, Merge to Mix.

``settings`` holds the recipe-facing settings (pydantic, imported by ``orchestrator.recipe``);
``coefficients`` the DAM coefficient file; ``dam`` the trainer (torch and transformers
only); ``search`` the evolutionary parameter search; ``merge_to_mix`` the subset search;
``runs`` the one place that merges, evaluates and records a candidate; ``records`` their
MLflow runs. Nothing here imports Prefect: the flows in ``flows/`` drive these.
"""
