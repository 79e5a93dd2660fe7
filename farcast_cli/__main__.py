from farcast_cli.cli import main

main()
