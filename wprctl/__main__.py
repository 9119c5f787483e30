from wprctl.cli import main

main()
