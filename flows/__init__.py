"""Prefect flows: merge_and_eval (plan → shards → assemble → evaluate → track), merge_documents
(a multi-document recipe: its intermediates, then the final merge, in one flow run), merge_shard
(one shard, what a worker runs) and sweep; the shard runners (``flows/runners/``) and the
deployments. They stay thin: the work is in orchestrator/, and nothing here imports the
application (mergefleet/)."""

from orchestrator.redact import install_log_redaction

install_log_redaction()  # a flow run's logs (terminal, Prefect's API) hold no credentials, in whatever process it runs
