import sys

from inferd.server.kserve.launch import main

sys.exit(main())
