package moert

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
)

func mustLoadOptions(t *testing.T) *LoadOptions {
	t.Helper()
	o, err := NewLoadOptions()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { o.Close() })
	return o
}

func TestLoadOptionsBoundModelLoads(t *testing.T) {
	path := modelPath(t)
	data, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	o := mustLoadOptions(t)

	// The defaults load the example (110720 parameters, 433 KiB as fp32).
	for _, opts := range []*LoadOptions{nil, o} {
		m, err := LoadModelWithOptions(path, opts)
		if err != nil {
			t.Fatalf("defaults: %v", err)
		}
		m.Close()
	}
	// Below the model's tensors: refused before anything is allocated, saying which limit.
	if err := o.SetMaxMemory(400 << 10); err != nil {
		t.Fatal(err)
	}
	_, err = LoadModelWithOptions(path, o)
	if e := wantCode(t, err, ErrLimit); !strings.Contains(e.Message, "moert_load_options_set_max_memory") {
		t.Errorf("message does not name the limit: %q", e.Message)
	}
	_, err = LoadModelBytesWithOptions(data, "", o)
	wantCode(t, err, ErrLimit)
	if err := o.SetMaxMemory(1 << 20); err != nil {
		t.Fatal(err)
	}
	m, err := LoadModelBytesWithOptions(data, "", o)
	if err != nil {
		t.Fatal(err)
	}
	m.Close()

	// The bytes read: the description alone is over a limit one byte short of it.
	if err := o.SetMaxFileBytes(uint64(len(data)) - 1); err != nil {
		t.Fatal(err)
	}
	_, err = LoadModelWithOptions(path, o)
	wantCode(t, err, ErrLimit)
	_, err = LoadModelBytesWithOptions(data, "", o)
	wantCode(t, err, ErrLimit)

	if ErrLimit.String() != "MOERT_ERR_LIMIT" {
		t.Errorf("ErrLimit is %v", ErrLimit)
	}
	o.Close()
	o.Close()
	wantCode(t, o.SetMaxMemory(1), ErrInvalidState)
	_, err = LoadModelWithOptions(path, o)
	wantCode(t, err, ErrInvalidState)
}

func TestLoadOptionsBoundCheckpointLoads(t *testing.T) {
	ckpt := filepath.Join(t.TempDir(), "ck.moert")
	m := mustModel(t)
	a := mustSession(t, m, ModeTraining, 1)
	trainStep(t, a, 0)
	if err := a.Save(ckpt); err != nil {
		t.Fatal(err)
	}
	b := mustSession(t, m, ModeTraining, 1)
	o := mustLoadOptions(t)
	if err := o.SetMaxMemory(1 << 20); err != nil {
		t.Fatal(err)
	}
	wantCode(t, b.LoadWithOptions(ckpt, o), ErrLimit)
	if n, _ := b.StepCount(); n != 0 {
		t.Fatalf("a refused load changed the step count to %d", n)
	}
	if err := b.LoadWithOptions(ckpt, nil); err != nil {
		t.Fatal(err)
	}
	if n, _ := b.StepCount(); n != 1 {
		t.Fatalf("step count %d after loading a checkpoint of step 1", n)
	}
}

// A checkpoint whose data file a link takes out of its directory: followed by default, refused
// under SetConfineExternalData(true) with the session left as it was.
func TestLoadOptionsConfineExternalData(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "ck")
	if err := os.Mkdir(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	ckpt := filepath.Join(dir, "ck.moert")
	m := mustModel(t)
	a := mustSession(t, m, ModeTraining, 1)
	trainStep(t, a, 0)
	if err := a.Save(ckpt); err != nil {
		t.Fatal(err)
	}
	data, err := filepath.Glob(filepath.Join(dir, "*.data"))
	if err != nil || len(data) != 1 {
		t.Fatalf("data files %v, %v", data, err)
	}
	moved := filepath.Join(filepath.Dir(dir), "elsewhere.data")
	if err := os.Rename(data[0], moved); err != nil {
		t.Fatal(err)
	}
	if err := os.Symlink(moved, data[0]); err != nil {
		t.Fatal(err)
	}
	o := mustLoadOptions(t)
	if err := o.SetConfineExternalData(true); err != nil {
		t.Fatal(err)
	}
	b := mustSession(t, m, ModeTraining, 1)
	err = b.LoadWithOptions(ckpt, o)
	if e := wantCode(t, err, ErrInvalidModel); !strings.Contains(e.Message, "outside the model's directory") {
		t.Errorf("message: %q", e.Message)
	}
	if n, _ := b.StepCount(); n != 0 {
		t.Fatalf("a refused load changed the step count to %d", n)
	}
	_, err = LoadModelWithOptions(ckpt, o)
	wantCode(t, err, ErrInvalidModel)
	if err := o.SetConfineExternalData(false); err != nil {
		t.Fatal(err)
	}
	if err := b.LoadWithOptions(ckpt, o); err != nil {
		t.Fatal(err)
	}
	if n, _ := b.StepCount(); n != 1 {
		t.Fatalf("step count %d after loading a checkpoint of step 1", n)
	}
}

// A description-only load answers as a full one and refuses a session.
func TestLoadOptionsDescriptionOnly(t *testing.T) {
	full := mustModel(t)
	o := mustLoadOptions(t)
	if err := o.SetDescriptionOnly(true); err != nil {
		t.Fatal(err)
	}
	m, err := LoadModelWithOptions(modelPath(t), o)
	if err != nil {
		t.Fatal(err)
	}
	defer m.Close()
	wantTotal, wantActivated, _ := full.NumParameters()
	total, activated, err := m.NumParameters()
	if err != nil || total != wantTotal || activated != wantActivated {
		t.Fatalf("parameters %d, %d (%v), want %d, %d", total, activated, err, wantTotal, wantActivated)
	}
	wantBytes, _ := full.ResidentBytes()
	if n, err := m.ResidentBytes(); err != nil || n != wantBytes {
		t.Fatalf("resident bytes %d (%v), want %d", n, err, wantBytes)
	}
	opts, err := NewSessionOptions()
	if err != nil {
		t.Fatal(err)
	}
	defer opts.Close()
	_, err = NewSession(m, opts)
	if e := wantCode(t, err, ErrInvalidArgument); !strings.Contains(e.Message, "description-only") {
		t.Errorf("message: %q", e.Message)
	}
}
