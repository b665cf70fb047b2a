from kvmpfn.cli import main

main()
