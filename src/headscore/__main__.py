from headscore.cli import main

main()
