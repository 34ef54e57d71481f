package dev.moert;

import static org.junit.jupiter.api.Assertions.assertEquals;
import static org.junit.jupiter.api.Assertions.assertThrows;
import static org.junit.jupiter.api.Assertions.assertTrue;

import java.io.IOException;
import java.nio.ByteBuffer;
import java.nio.file.Files;
import java.nio.file.Path;
import org.junit.jupiter.api.Test;
import org.junit.jupiter.api.function.Executable;
import org.junit.jupiter.api.io.TempDir;

/** Load limits through the Java binding, on the example model (110720 parameters, 433 KiB). */
class LoadOptionsTest {
  private static final String MODEL = System.getProperty("moert.test.model");

  @TempDir Path dir;

  private static MoertException expectLimit(Executable call) {
    MoertException e = assertThrows(MoertException.class, call);
    assertEquals(CapiConstants.MOERT_ERR_LIMIT, e.getCode(), e.getMessage());
    assertEquals("MOERT_ERR_LIMIT", e.getCodeName());
    return e;
  }

  private static MoertException expectInvalidModel(Executable call) {
    MoertException e = assertThrows(MoertException.class, call);
    assertEquals(CapiConstants.MOERT_ERR_INVALID_MODEL, e.getCode(), e.getMessage());
    return e;
  }

  @Test
  void limitsRefuseModelLoadsAboveThemAndAllowThoseBelow() throws IOException {
    byte[] bytes = Files.readAllBytes(Path.of(MODEL));
    try (LoadOptions options = LoadOptions.create()) {
      options.loadModel(MODEL).close();
      options.maxMemory(400 << 10);
      MoertException e = expectLimit(() -> options.loadModel(Path.of(MODEL)));
      assertTrue(e.getMessage().contains("moert_load_options_set_max_memory"), e.getMessage());
      expectLimit(() -> options.loadModel(ByteBuffer.wrap(bytes), null));
      options.maxMemory(1 << 20);
      try (Model m = options.loadModel(ByteBuffer.wrap(bytes), null)) {
        assertEquals(6, m.numLayers());
      }
      options.maxFileBytes(bytes.length - 1);
      expectLimit(() -> options.loadModel(MODEL));
      expectLimit(() -> options.loadModel(ByteBuffer.wrap(bytes), null));
    }
  }

  @Test
  void limitsBoundCheckpointLoadsAndARefusalKeepsTheSession() {
    Path ckpt = dir.resolve("ck.moert");
    try (Model model = Model.load(MODEL);
        SessionOptions so = SessionOptions.create().mode(CapiConstants.MOERT_MODE_TRAINING);
        Session a = Session.create(model, so);
        Session b = Session.create(model, so);
        LoadOptions options = LoadOptions.create().maxMemory(1 << 20)) {
      a.zeroGrad();
      int[] ids = new int[16 * 4];
      int[] targets = new int[16];
      a.forwardTokens(ids, 16);
      a.backwardLoss(targets);
      a.step();
      a.save(ckpt.toString());
      expectLimit(() -> options.loadCheckpoint(b, ckpt.toString()));
      assertEquals(0, b.stepCount());
      options.maxMemory(-1L); // UINT64_MAX: the session's own bound alone
      options.loadCheckpoint(b, ckpt.toString());
      assertEquals(1, b.stepCount());
      // Loaded as a model, it tells its step and the balancing state it saved.
      try (Model cm = Model.load(ckpt)) {
        assertEquals(1, cm.checkpointStep());
        assertEquals(
            (double) 0.001f, cm.moeFloat(2, CapiConstants.MOERT_MOE_SAVED_BIAS_UPDATE_RATE));
        assertEquals(0, cm.moeInt(2, CapiConstants.MOERT_MOE_SAVED_BIAS_FROZEN));
      }
      assertEquals(-1, model.checkpointStep());
    }
  }

  @Test
  void confineExternalDataRefusesADataFileLinkedFromOutside() throws IOException {
    Path ckDir = Files.createDirectory(dir.resolve("ck"));
    Path ckpt = ckDir.resolve("ck.moert");
    try (Model model = Model.load(MODEL);
        SessionOptions so = SessionOptions.create().mode(CapiConstants.MOERT_MODE_TRAINING);
        Session a = Session.create(model, so);
        Session b = Session.create(model, so);
        LoadOptions options = LoadOptions.create().confineExternalData(true)) {
      a.zeroGrad();
      a.forwardTokens(new int[16 * 4], 16);
      a.backwardLoss(new int[16]);
      a.step();
      a.save(ckpt.toString());
      // The checkpoint's data file moves out of its directory, and a link takes its place.
      Path data;
      try (var files = Files.list(ckDir)) {
        data = files.filter(p -> p.toString().endsWith(".data")).findFirst().orElseThrow();
      }
      Path moved = Files.move(data, dir.resolve("elsewhere.data"));
      Files.createSymbolicLink(data, moved);
      MoertException e = expectInvalidModel(() -> options.loadCheckpoint(b, ckpt.toString()));
      assertTrue(e.getMessage().contains("outside the model's directory"), e.getMessage());
      assertEquals(0, b.stepCount());
      expectInvalidModel(() -> options.loadModel(ckpt));
      options.confineExternalData(false);
      options.loadCheckpoint(b, ckpt.toString());
      assertEquals(1, b.stepCount());
    }
  }

  @Test
  void aDescriptionOnlyModelAnswersAsAFullOneAndRefusesASession() {
    try (Model full = Model.load(MODEL);
        LoadOptions options = LoadOptions.create().descriptionOnly(true);
        Model described = options.loadModel(MODEL)) {
      assertEquals(full.numParameters(), described.numParameters());
      assertEquals(full.residentBytes(), described.residentBytes());
      MoertException e =
          assertThrows(MoertException.class, () -> Session.create(described, null).close());
      assertEquals(CapiConstants.MOERT_ERR_INVALID_ARGUMENT, e.getCode(), e.getMessage());
      assertTrue(e.getMessage().contains("description-only"), e.getMessage());
    }
  }

  @Test
  void closedOptionsRefuseCalls() {
    LoadOptions options = LoadOptions.create();
    options.close();
    options.close();
    MoertException e = assertThrows(MoertException.class, () -> options.maxMemory(1));
    assertEquals(CapiConstants.MOERT_ERR_INVALID_STATE, e.getCode());
  }
}
