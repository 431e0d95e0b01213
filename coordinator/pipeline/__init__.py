"""The pipeline across node processes: clients for the ``Node`` service, weight streaming, local node spawning,
and ``PipelineEngine``, the ``TokenEngine`` that ``llama_shard.generate.generate`` drives.

Async API (for the scheduler): ``PipelineClient.forward(rows) -> [RowOutput]``, many frames in flight at once.
Sync API (for ``generate``): ``PipelineEngine.step(tokens, start) -> token``.
"""
