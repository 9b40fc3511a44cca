"""The project's two kinds of failure, which the command line turns into one line and an exit code.

Anything else that is raised is a bug in the project (or in torch), and shows its traceback.
"""


class BadInput(ValueError):
    """A flag, file or record that cannot be used as given: one line naming it, exit code 2.

    Raised before any work where the input can be checked first. It is a ValueError, so code that
    calls the project as a library can catch it as one."""


class RunFailed(Exception):
    """The run could not go on (its loss diverged, a file could not be written): one line saying
    what is kept and how to continue, exit code 1."""


class TrainingDiverged(RunFailed):
    """A NaN or infinite loss or adapter weight: stopped, the last good checkpoint kept."""
