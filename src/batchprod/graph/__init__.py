"""Quantum graphs: the data registry, data queries, the compact graph and its builder."""

from batchprod.graph.builder import build_quantum_graph, describe
from batchprod.graph.quantum_graph import DatasetRef, QuantumGraph, TaskNode
from batchprod.graph.query import DataQuery
from batchprod.graph.registry import Registry

__all__ = ["DataQuery", "DatasetRef", "QuantumGraph", "Registry", "TaskNode", "build_quantum_graph", "describe"]
