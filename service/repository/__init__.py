"""The model repository: the models this process serves, their versions, and their directory.

One `ModelRegistry` per process (per uvicorn worker): it holds no state another process needs,
so replicas and workers each watch the same directory and agree because they read the same files.
A session is pinned by the fingerprint its state records (service/state_codec.py), not by
anything held here.
"""

from service.repository.registry import ModelRegistry
from service.repository.versions import ModelEntry, ServedVersion

__all__ = ["ModelEntry", "ModelRegistry", "ServedVersion"]
