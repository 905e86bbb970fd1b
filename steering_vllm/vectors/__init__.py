"""Steering vectors as data: the ``SteeringVectors`` table, the file formats it reads and writes, and the
``convert`` / ``inspect`` commands (``python -m steering_vllm.vectors.convert``, ``... .inspect``)."""

from steering_vllm.vectors.formats import FORMAT, FORMAT_VERSION, SITE, SteeringVectorsError
from steering_vllm.vectors.steering_vectors import SteeringVectors, table_hash

__all__ = ["FORMAT", "FORMAT_VERSION", "SITE", "SteeringVectors", "SteeringVectorsError", "table_hash"]
