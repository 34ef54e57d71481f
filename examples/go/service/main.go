// Command service serves a moert model over HTTP: it loads the model once, creates one session,
// and answers forward requests from as many goroutines (connections) as arrive, all sharing that
// session, which serialises the calls inside the library.
//
//	service -model examples/models/tiny_moe.moert -addr 127.0.0.1:8080 -threads 2
//
//	POST /forward  {"tokens": [[1,2,3,4], ...]}      token-id rows, for token models
//	               {"hidden": [[0.1, ...], ...]}     hidden-state rows, for hidden-state models
//	            -> {"rows": 2, "width": 64, "outputs": [[...], ...]}
//	GET  /model -> {"name": "tiny-moe", "input_kind": 1, "input_width": 4, "output_width": 64, ...}
package main

import (
	"context"
	"errors"
	"flag"
	"log"
	"net"
	"net/http"
	"os"
	"os/signal"
	"syscall"
	"time"
)

func main() {
	modelPath := flag.String("model", "examples/models/tiny_moe.moert", "model file")
	addr := flag.String("addr", "127.0.0.1:8080", "listen address")
	threads := flag.Int("threads", 2, "worker threads of the session")
	flag.Parse()

	svc, err := NewService(*modelPath, *threads)
	if err != nil {
		log.Fatal(err)
	}
	defer svc.Close()

	ln, err := net.Listen("tcp", *addr)
	if err != nil {
		log.Fatal(err)
	}
	srv := &http.Server{Handler: svc.Handler(), ReadHeaderTimeout: 10 * time.Second}
	log.Printf("serving %s on http://%s", svc.info.Name, ln.Addr())

	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	go func() {
		<-ctx.Done()
		shutdown, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		srv.Shutdown(shutdown)
	}()
	if err := srv.Serve(ln); err != nil && !errors.Is(err, http.ErrServerClosed) {
		log.Fatal(err)
	}
}
