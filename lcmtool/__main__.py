from lcmtool.cli import main

main()
