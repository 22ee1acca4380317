"""``modules.scripts``: ``basedir()`` is the extension dir only while a script imports."""

current_basedir = ""


def basedir() -> str:
    return current_basedir


class ScriptRunner:
    """An empty runner, as ``ScriptRunner()`` is before ``initialize_scripts``."""

    def __init__(self) -> None:
        self.scripts: list = []
        self.alwayson_scripts: list = []
        self.selectable_scripts: list = []
