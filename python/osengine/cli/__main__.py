"""python -m osengine.cli: the osengine command."""
import sys

from .main import main

sys.exit(main())
