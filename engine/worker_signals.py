"""Imported only inside the data loaders' fork server (`loader.worker_processes` preloads it there), never by a
training process: the server ignores the stop signals (`loader.ignore_stop_signals`), so that it outlives a
SIGTERM sent to every process of a job and keeps its workers (which watch it as their parent) alive until the
training process has written its recovery checkpoint."""
from engine.loader import ignore_stop_signals

ignore_stop_signals()
