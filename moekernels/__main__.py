from moekernels.cli import main

main()
