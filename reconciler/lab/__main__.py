from reconciler.lab.netns import main

main()
