from u2moe.cli import main

main()
