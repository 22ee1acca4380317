"""Run by the WebUI at every start (and after "Install from URL").

The WebUI already ships everything the extension needs (torch, safetensors, numpy, tqdm),
so this normally does nothing. It installs only a package that is missing, unpinned, so
the WebUI's own pins are never changed; ``launch.run_pip`` is a no-op with
``--skip-install``. Idempotent and fast.
"""

import launch

REQUIRED = ("safetensors", "numpy", "tqdm")

for package in REQUIRED:
    if not launch.is_installed(package):
        launch.run_pip(f"install {package}", f"{package} for LoRACLR Merge")
