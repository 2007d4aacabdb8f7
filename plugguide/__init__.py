"""Off-the-shelf models steering diffusion models, as Lightning jobs.

The project's folders are mapped under this import name (see `pyproject.toml`):
`plugguide.pipelines`, `plugguide.modules`, `plugguide.datamodules`, `plugguide.callbacks`,
`plugguide.metrics`.
"""

__version__ = "0.1.0"
