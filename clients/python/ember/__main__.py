from .rl import main
import sys

sys.exit(main())
