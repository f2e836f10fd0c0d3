"""nbgrader configuration for a course built on this book's chapters (copy it to the course folder's root).

Course layout: ``source/<assignment>/<chapter>.ipynb`` holds the book's notebooks (with solutions);
``nbgrader generate_assignment <assignment>`` writes the student version to ``release/``, and
``nbgrader autograde <assignment>`` grades ``submitted/<student>/<assignment>/`` into ``autograded/``.
"""

import os

c = get_config()  # noqa: F821 (nbgrader provides get_config when it loads this file)

c.CourseDirectory.course_id = "attention-for-vision"

# Seconds per cell. nbgrader's default, 30 s, is too short: Chapter 1 trains a small CNN in one cell
# (about 2 minutes in full mode on the book's 2-core CPU; a slower machine can pass 30 s even in quick mode) and
# Chapters 3 to 6 train for longer.
c.Execute.timeout = 600

# Grade in quick mode (subsets, few epochs; the graders do not depend on it) unless the shell says otherwise.
# Also set COMPANION_DATA in the shell to the folder that holds CIFAR-10 (default ~/.cache/companion).
os.environ.setdefault("COMPANION_QUICK", "1")
