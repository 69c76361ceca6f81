"""Relational tasks: prompts with expected answers, the built-in ones and a JSON format of your own.

A :class:`Task` is data (a template, demonstrations and items), not an analysis: the relational
analyses score and intervene on it, amnesic probing measures task accuracy under erasure, and
probing builds datasets from its prompts.
"""

from mechprobe.tasks._format import TaskItem
from mechprobe.tasks._task import Task, as_task, list_tasks, load_task

__all__ = ["Task", "TaskItem", "as_task", "list_tasks", "load_task"]
