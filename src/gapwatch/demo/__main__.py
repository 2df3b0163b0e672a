"""``python -m gapwatch.demo``: the main job."""

from gapwatch.demo.main import main

main()
