"""``modules.scripts``: ``basedir()`` is the extension dir only while a script imports."""

current_basedir = ""


def basedir() -> str:
    return current_basedir
