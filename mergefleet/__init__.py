"""mergefleet, the application: the command line, its progress display, the demo and
the tiny-model fixtures the demo and the tests train.

It sits above the library (``orchestrator/``) and the Prefect flows (``flows/``) and may
import both; neither may import it (``tests/test_architecture.py`` checks that).
"""
