// A Go program that uses the installed module moert.dev/moert, as a user's program would.
package main

import (
	"fmt"
	"os"

	"moert.dev/moert"
)

func main() {
	model, err := moert.LoadModel(os.Args[1])
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	defer model.Close()
	session, err := moert.NewSession(model, nil)
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	defer session.Close()
	out, err := session.ForwardTokens([]int32{1, 2, 3, 4}, 1)
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	fmt.Printf("consumer: moert %s, %d outputs\n", moert.Version(), len(out))
}
