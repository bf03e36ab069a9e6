"""Class-incremental learning: scenarios, exemplar memory, metrics and learners."""
from hdqt.cl.memory import ExemplarMemory
from hdqt.cl.scenario import ClassIncrementalScenario, Task

__all__ = ["ClassIncrementalScenario", "ExemplarMemory", "Task"]
