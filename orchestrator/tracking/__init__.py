"""Lineage: one MLflow run per merge, recorded the same way every time so that merges
compare side by side in the MLflow UI.

Modules: ``record`` (``start_merge_run``, ``track_merge``, ``fail_merge_run``: the run of
one merge), ``store`` (where runs go and
how to open them), ``charts`` (score charts) and ``compare`` (a table of recorded merges,
and the comparison recorded back into MLflow).

A flow's merge run lives as long as the merge: ``start_merge_run`` opens it when the flow
starts (RUNNING; tags method, experts, target, recipe hash, output), the track step fills it
(``track_merge(run_id=...)``) and ends it FINISHED; a step that fails, or a refusal (the
output's lock held, a plan refused), ends it FAILED with tag ``mergefleet.error`` (the
error's type and first line, redacted) at the top of its description. ``mergefleet merge``,
sweeps and searches record a run when the merge is done (``track_merge`` alone).

A merge's run holds
- short params for comparing merges (``method``, ``experts``, ``density``, ``weight.<expert>``)
  and the recipe as params (flattened: ``recipe.models.1.parameters.density``) and as
  ``recipe.yaml``; as its description, the scores table (``orchestrator.report``);
- tags ``mergefleet.method``, ``mergefleet.experts``, ``mergefleet.plan_id``, ...;
- every input checkpoint as a run input (a dataset entry whose source is the input's URI
  and whose digest is its fingerprint; context ``base`` or ``expert``);
- one nested run per shard (bytes written and read, seconds, bytes per second), spanning the
  shard's own start and end from its receipt (a shard reused from an earlier run keeps the
  times of the run that wrote it, with param ``skipped``);
- the evaluation: ``avg_normalised`` and ``avg_score`` (means over the tasks, logged first
  and named to sort first: MLflow's views list metrics in logging or key order), ``score/<task>`` (the merged checkpoint's
  primary metric), ``normalised/<task>``, ``merged/<task>/<metric>`` (everything lm-eval
  reported), ``base/<task>`` and ``expert/<name>/<task>`` when the inputs were evaluated;
- the merge's size and time: ``bytes/written``, ``bytes/read``, ``time/merge``,
  ``time/eval``, ``time/shards_total``, ``time/shards_max``;
- ``protected_drop_rate/<model>`` for a method that protects experts' top-k entries
  (also a second panel of ``scores.png``);
- artifacts ``recipe.yaml``, ``mergefleet.json`` (the manifest), ``evaluation.json`` and
  ``scores.png`` (merged vs base vs experts per task);
- the merged checkpoint as an MLflow logged model. Its weights stay where the merge wrote
  them: the model is an *external* one (MLflow's term) whose ``mergefleet.checkpoint_uri``
  tag, ``checkpoint`` param and ``checkpoint.json`` artifact give that location; optionally
  registered, the version linked to the model (``models:/<id>``, ``mlflow.modelVersions``).

Experiments are created as MLflow 3's classic model-training kind; ``compare.log_comparison``
keeps a ``comparison`` run per experiment with a chart of all its merges.

Tracking goes to ``tracking_uri`` (argument, then ``fleet.tracking_uri``, then
``MLFLOW_TRACKING_URI``), by default a SQLite file ``mlflow.db`` beside a local output
(in its parent directory) with artifacts in ``mlartifacts/`` next to it; ``~/.mergefleet``
for a remote output. The file store is deprecated in MLflow 3 and is not used.

Only ``MlflowClient`` with an explicit URI is used: no global MLflow state, so merges of
a sweep may be tracked from several threads.
"""
