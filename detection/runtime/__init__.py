"""Process-wide runtime concerns with one owner each: the device and numeric precision
(`device.py`) and the torchrun process group (`distributed.py`)."""
