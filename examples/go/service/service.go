package main

import (
	"encoding/json"
	"errors"
	"fmt"
	"net/http"

	"moert.dev/moert"
)

// ModelInfo is what GET /model answers.
type ModelInfo struct {
	Name        string          `json:"name"`
	InputKind   moert.InputKind `json:"input_kind"`
	InputWidth  int             `json:"input_width"`
	OutputWidth int             `json:"output_width"`
	Layers      int             `json:"layers"`
	Parameters  uint64          `json:"parameters"`
}

// ForwardRequest is the body of POST /forward: rows of token ids or of hidden values.
type ForwardRequest struct {
	Tokens [][]int32   `json:"tokens,omitempty"`
	Hidden [][]float32 `json:"hidden,omitempty"`
}

// ForwardResponse holds one output row per input row.
type ForwardResponse struct {
	Rows    int         `json:"rows"`
	Width   int         `json:"width"`
	Outputs [][]float32 `json:"outputs"`
}

// maxRows bounds one request's batch.
const maxRows = 4096

// Service owns one model session shared by every request.
type Service struct {
	session *moert.Session
	info    ModelInfo
}

// NewService loads the model once and creates the session all requests share. The model handle
// is released right away: the session keeps what it needs.
func NewService(path string, threads int) (*Service, error) {
	model, err := moert.LoadModel(path)
	if err != nil {
		return nil, err
	}
	defer model.Close()
	name, err := model.Name()
	if err != nil {
		return nil, err
	}
	io, err := model.IO()
	if err != nil {
		return nil, err
	}
	layers, err := model.NumLayers()
	if err != nil {
		return nil, err
	}
	total, _, err := model.NumParameters()
	if err != nil {
		return nil, err
	}
	opts, err := moert.NewSessionOptions()
	if err != nil {
		return nil, err
	}
	defer opts.Close()
	if err := opts.SetThreads(threads); err != nil {
		return nil, err
	}
	session, err := moert.NewSession(model, opts)
	if err != nil {
		return nil, err
	}
	return &Service{session: session, info: ModelInfo{Name: name, InputKind: io.Input,
		InputWidth: io.InputWidth, OutputWidth: io.OutputWidth, Layers: layers, Parameters: total}}, nil
}

// Close releases the session after the requests in flight.
func (s *Service) Close() error { return s.session.Close() }

// Handler routes /model and /forward.
func (s *Service) Handler() http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc("/model", func(w http.ResponseWriter, r *http.Request) {
		if r.Method != http.MethodGet {
			http.Error(w, "use GET", http.StatusMethodNotAllowed)
			return
		}
		writeJSON(w, http.StatusOK, s.info)
	})
	mux.HandleFunc("/forward", s.forward)
	return mux
}

func (s *Service) forward(w http.ResponseWriter, r *http.Request) {
	if r.Method != http.MethodPost {
		http.Error(w, "use POST", http.StatusMethodNotAllowed)
		return
	}
	var req ForwardRequest
	dec := json.NewDecoder(http.MaxBytesReader(w, r.Body, 64<<20))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&req); err != nil {
		http.Error(w, "bad request body: "+err.Error(), http.StatusBadRequest)
		return
	}
	out, rows, err := s.run(&req)
	if err != nil {
		status := http.StatusInternalServerError
		var me *moert.Error
		if errors.As(err, &me) && (me.Code == moert.ErrInvalidArgument || me.Code == moert.ErrNumeric) {
			status = http.StatusBadRequest
		}
		http.Error(w, err.Error(), status)
		return
	}
	resp := ForwardResponse{Rows: rows, Width: s.info.OutputWidth, Outputs: make([][]float32, rows)}
	for i := range resp.Outputs {
		resp.Outputs[i] = out[i*s.info.OutputWidth : (i+1)*s.info.OutputWidth]
	}
	writeJSON(w, http.StatusOK, resp)
}

// run flattens the request's rows, checking their widths, and runs the shared session.
func (s *Service) run(req *ForwardRequest) ([]float32, int, error) {
	width := s.info.InputWidth
	badRows := func(rows int) error {
		if rows == 0 || rows > maxRows {
			return &moert.Error{Code: moert.ErrInvalidArgument, Message: fmt.Sprintf("%d rows (1 to %d)", rows, maxRows)}
		}
		return nil
	}
	switch s.info.InputKind {
	case moert.InputTokens:
		if req.Hidden != nil {
			return nil, 0, &moert.Error{Code: moert.ErrInvalidArgument, Message: "this model takes \"tokens\""}
		}
		if err := badRows(len(req.Tokens)); err != nil {
			return nil, 0, err
		}
		ids := make([]int32, 0, len(req.Tokens)*width)
		for i, row := range req.Tokens {
			if len(row) != width {
				return nil, 0, &moert.Error{Code: moert.ErrInvalidArgument,
					Message: fmt.Sprintf("row %d has %d ids, the model takes %d", i, len(row), width)}
			}
			ids = append(ids, row...)
		}
		out, err := s.session.ForwardTokens(ids, len(req.Tokens))
		return out, len(req.Tokens), err
	default:
		if req.Tokens != nil {
			return nil, 0, &moert.Error{Code: moert.ErrInvalidArgument, Message: "this model takes \"hidden\""}
		}
		if err := badRows(len(req.Hidden)); err != nil {
			return nil, 0, err
		}
		in := make([]float32, 0, len(req.Hidden)*width)
		for i, row := range req.Hidden {
			if len(row) != width {
				return nil, 0, &moert.Error{Code: moert.ErrInvalidArgument,
					Message: fmt.Sprintf("row %d has %d values, the model takes %d", i, len(row), width)}
			}
			in = append(in, row...)
		}
		out, err := s.session.ForwardHidden(in, len(req.Hidden))
		return out, len(req.Hidden), err
	}
}

func writeJSON(w http.ResponseWriter, status int, v any) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(status)
	json.NewEncoder(w).Encode(v)
}
