import dev.moert.CapiConstants;
import dev.moert.Model;
import dev.moert.Moert;
import dev.moert.Session;
import dev.moert.SessionOptions;
import java.nio.FloatBuffer;
import java.nio.IntBuffer;
import java.nio.file.Files;
import java.nio.file.Path;

/**
 * Loads a moert model, runs a forward pass through direct buffers, prints how the routers spread
 * the tokens, takes a few training steps and saves and reloads a checkpoint.
 *
 * <pre>
 * java -Djava.library.path=DIR_OF_libmoert_jni -cp moert.jar:. MoertExample MODEL_FILE
 * </pre>
 */
public final class MoertExample {
  private MoertExample() {}

  public static void main(String[] args) throws Exception {
    String path = args.length > 0 ? args[0] : "examples/models/tiny_moe.moert";
    System.out.println("moert " + Moert.version() + " (ABI " + Moert.abiVersion() + ")");
    try (Model model = Model.load(path)) {
      Model.Io io = model.io();
      System.out.printf(
          "model '%s': %d layers, %d parameters%n",
          model.name(), model.numLayers(), model.numParameters().total());
      if (io.inputKind() != CapiConstants.MOERT_INPUT_TOKENS) {
        throw new IllegalStateException("this example feeds token ids");
      }

      int rows = 64;
      IntBuffer tokens = Moert.allocateInts(rows * io.inputWidth());
      for (int i = 0; i < tokens.capacity(); i++) {
        tokens.put(i, (i * 7 + i / 3) % 64);
      }
      FloatBuffer out = Moert.allocateFloats(rows * io.outputWidth());
      try (SessionOptions options = SessionOptions.create().threads(2);
          Session session = Session.create(model, options)) {
        session.forwardTokens(tokens, rows, out);
        System.out.printf("forward: %d rows -> out[0][0..2] = %.5f %.5f %.5f%n",
            rows, out.get(0), out.get(1), out.get(2));
        for (Model.Layer layer : model.layers()) {
          if (layer.kind() == CapiConstants.MOERT_LAYER_MOE) {
            long[] counts = session.expertCounts(layer.index(), CapiConstants.MOERT_COUNTS_LAST);
            System.out.printf("layer %d '%s' tokens per expert: %s  MaxVio %.3f%n",
                layer.index(), layer.name(), java.util.Arrays.toString(counts),
                session.maxVio(layer.index(), CapiConstants.MOERT_COUNTS_LAST));
          }
        }
      }

      try (SessionOptions options =
              SessionOptions.create().mode(CapiConstants.MOERT_MODE_TRAINING).config("lr", "0.01");
          Session trainer = Session.create(model, options)) {
        int[] ids = new int[rows * io.inputWidth()];
        tokens.get(0, ids);
        int[] targets = new int[rows];
        for (int r = 0; r < rows; r++) {
          targets[r] = ids[r * io.inputWidth() + io.inputWidth() - 1];
        }
        for (int step = 0; step < 5; step++) {
          trainer.zeroGrad();
          trainer.forwardTokens(ids, rows);
          double loss = trainer.backwardLoss(targets);
          Session.Step s = trainer.step();
          System.out.printf("step %d: loss %.4f, grad norm %.4f%n", step + 1, loss,
              s.gradientNorm());
        }
        Path dir = Files.createTempDirectory("moert-example");
        Path ckpt = dir.resolve("step-5.moert");
        trainer.save(ckpt.toString());
        trainer.load(ckpt.toString());
        System.out.println("checkpoint reloaded at step " + trainer.stepCount());
        // A checkpoint is a description and, for arrays of 64 KiB and more, a data file beside
        // it: remove the folder with everything in it.
        try (var files = Files.walk(dir)) {
          for (Path p : files.sorted(java.util.Comparator.reverseOrder()).toList()) {
            Files.delete(p);
          }
        }
      }
    }
  }
}
