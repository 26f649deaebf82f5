from dsv4cli.cli.app import main

main()
