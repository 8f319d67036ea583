from eedn.cli.main import main

main()
