from eedn.cli import main

main()
