"""Tasks: classification, detection, and on fusion encoders VQA, NLVR2 and retrieval, each owning its data, batches,
metrics and evaluation."""
from vlprompt.tasks.base import TASKS, Task, register_task, task_class
from vlprompt.tasks.batches import ClassificationBatch, DetectionBatch, NLVR2Batch, RetrievalBatch, StepOutput
from vlprompt.tasks.classification import ClassificationTask
from vlprompt.tasks.detection import DetectionTask
from vlprompt.tasks.nlvr2 import NLVR2Task
from vlprompt.tasks.retrieval import RetrievalTask
from vlprompt.tasks.vqa import VQATask

__all__ = ["TASKS", "ClassificationBatch", "ClassificationTask", "DetectionBatch", "DetectionTask", "NLVR2Batch",
           "NLVR2Task", "RetrievalBatch", "RetrievalTask", "StepOutput", "Task", "VQATask", "register_task",
           "task_class"]
