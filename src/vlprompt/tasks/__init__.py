"""Tasks: classification, detection and VQA, each owning its data, batches, metrics and evaluation."""
from vlprompt.tasks.base import TASKS, Task, register_task, task_class
from vlprompt.tasks.batches import ClassificationBatch, DetectionBatch, StepOutput
from vlprompt.tasks.classification import ClassificationTask
from vlprompt.tasks.detection import DetectionTask
from vlprompt.tasks.vqa import VQATask

__all__ = ["TASKS", "ClassificationBatch", "ClassificationTask", "DetectionBatch", "DetectionTask", "StepOutput",
           "Task", "VQATask", "register_task", "task_class"]
