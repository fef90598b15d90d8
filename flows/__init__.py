"""Prefect flows: merge_and_eval (plan → shards → assemble → evaluate → track) and
merge_shard (one shard, what a worker runs). They stay thin: the work is in orchestrator/."""
